"""The bucketed-LRU eviction policy of the HBM buffer, in one place: which slots give up their
page when a request needs room. Used by retrieval (`spin_retrieve.py`: the fused kernels call
the Triton half, their torch reference the torch half) and by the cache manager when it shrinks
a request's buffer.

Keys (`lru_keys` / `lru_keys_ref`): 0 = empty slot (taken first), 1 + recency bucket for a slot
holding a page (bucket 0 = oldest), `num_keys - 1` = protected (the caller's: pages in use this
step, list padding; only taken if `need` demands it, which the caller must never let happen).
Victims (`lru_pick` in a program, `lru_victims` / `lru_victims_ref` per row): the `need`
entries with the smallest key, ties broken by lower index, with a histogram over the few key
values and no sort, in one vectorized pass: histogram → cumulative counts → threshold key per
row → rank inside the threshold key by a running count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def lru_num_keys(lru_buckets: int) -> int:
    """Key values of a buffer with `lru_buckets` recency buckets: empty, one per bucket and
    protected."""
    return lru_buckets + 2


def lru_keys_ref(
    occupant: torch.Tensor,  # [...] int the page each slot holds, -1 = empty
    bucket: torch.Tensor,  # [...] uint8/int its recency bucket
) -> torch.Tensor:  # [...] int64 keys
    """Eviction keys of slots: 0 when empty, else 1 + recency bucket (protect on top)."""
    return torch.where(occupant < 0, 0, bucket.long() + 1)


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
def lru_keys(occupant, bucket):
    """`lru_keys_ref` inside a program: 0 when empty, else 1 + recency bucket."""
    return tl.where(occupant < 0, 0, bucket + 1)


@triton.jit
def lru_pick(keys, need, valid, NUM_BINS: tl.constexpr):
    """`lru_victims_ref` of one row inside a program: the victim mask of the `need` smallest
    keys among the `valid` lanes (keys < NUM_BINS; invalid lanes may hold any key in range),
    ties broken by lower index."""
    hist = tl.histogram(keys, NUM_BINS)  # [NUM_BINS]
    upto = tl.cumsum(hist, 0)
    threshold = tl.sum((upto < need).to(tl.int32), 0)
    bins = tl.arange(0, NUM_BINS)
    before = tl.sum(tl.where(bins < threshold, hist, 0), 0)
    at = (keys == threshold) & valid
    rank = tl.cumsum(at.to(tl.int32), 0) - 1
    return ((keys < threshold) | (at & (rank < need - before))) & valid


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
    victim = lru_pick(keys, need, mask, NUM_BINS)
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
