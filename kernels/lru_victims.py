"""Bucketed-LRU victim selection: per row, pick the `need` entries with the smallest key
(ties: lowest index first) using a histogram over the few key values, with no sort.

Keys are small integers: 0 = empty slot (take first), 1 + recency bucket for evictable pages
(bucket 0 = oldest), anything larger = protected (only taken if `need` demands it, which the
caller must never let happen). One vectorized pass: histogram → cumulative counts → threshold
key per row → rank inside the threshold key by a running count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def lru_victims_ref(
    keys: torch.Tensor,  # [R, N] integer keys in [0, num_keys)
    need: torch.Tensor,  # [R] int  victims wanted per row
    num_keys: int,
) -> torch.Tensor:  # [R, N] bool
    """Victim mask: the `need[r]` smallest keys of row r, ties broken by lower index."""
    rows, n = keys.shape
    keys = keys.long()
    hist = torch.zeros(rows, num_keys, dtype=torch.long, device=keys.device)
    hist.scatter_add_(1, keys, torch.ones_like(keys))  # [R, K]
    upto = hist.cumsum(1)  # [R, K] entries with key <= k
    need = need.long()[:, None]  # [R, 1]
    threshold = (upto < need).sum(1, keepdim=True)  # [R, 1] first key whose count reaches need
    before = torch.where(torch.arange(num_keys, device=keys.device) < threshold, hist, 0).sum(
        1, keepdim=True
    )  # [R, 1] entries with key < threshold
    at = keys == threshold  # [R, N]
    rank = at.long().cumsum(1) - 1  # [R, N] order among entries with the threshold key
    return (keys < threshold) | (at & (rank < need - before))


@triton.jit
def _victims_kernel(
    keys_ptr,
    need_ptr,
    out_ptr,
    stride_k,
    stride_o,
    N,
    NUM_BINS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    keys = tl.load(keys_ptr + row * stride_k + offs, mask=mask, other=NUM_BINS - 1).to(tl.int32)
    need = tl.load(need_ptr + row).to(tl.int32)
    hist = tl.histogram(keys, NUM_BINS)  # [NUM_BINS]
    upto = tl.cumsum(hist, 0)
    threshold = tl.sum((upto < need).to(tl.int32), 0)
    bins = tl.arange(0, NUM_BINS)
    before = tl.sum(tl.where(bins < threshold, hist, 0), 0)
    at = (keys == threshold) & mask
    rank = tl.cumsum(at.to(tl.int32), 0) - 1
    victim = ((keys < threshold) | (at & (rank < need - before))) & mask
    tl.store(out_ptr + row * stride_o + offs, victim.to(tl.int8), mask=mask)


def lru_victims(
    keys: torch.Tensor,  # [R, N] uint8/int  keys in [0, num_keys)
    need: torch.Tensor,  # [R] int
    num_keys: int,
) -> torch.Tensor:  # [R, N] bool
    """Triton version of `lru_victims_ref` (one program per row)."""
    assert keys.dim() == 2 and keys.stride(1) == 1
    assert need.shape == (keys.shape[0],)
    assert 0 < num_keys <= 256
    rows, n = keys.shape
    out = torch.empty(rows, n, dtype=torch.int8, device=keys.device)
    if rows == 0 or n == 0:
        return out.bool()
    num_bins = triton.next_power_of_2(num_keys + 1)  # +1: padding lanes get the last bin
    _victims_kernel[(rows,)](
        keys,
        need,
        out,
        keys.stride(0),
        out.stride(0),
        n,
        NUM_BINS=num_bins,
        BLOCK_N=triton.next_power_of_2(n),
    )
    return out.bool()
