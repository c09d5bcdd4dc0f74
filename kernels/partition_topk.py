"""Top-k partitions of each (sequence, KV head) row of partition scores: the indices of the k
best scores, -1 where a row has fewer than k selectable (finite) scores. -inf marks a partition
that must not be chosen (past the context, or already attended through the sink/local window).

Kernel: one program per row, the whole row in registers (P <= `MAX_PARTITIONS`; a row with a
given range [start, length), e.g. its pages between the sink and the local window, reads only
that range, in the smallest of 1/8, 1/2 or the whole register block that holds it, chosen at
run time, so CUDA graphs can fix P). Scores are
mapped to int32 keys whose signed order is the float order; a 32-step bisection over the key
range finds T, the k-th largest key; a compaction pass then writes every index with key > T
and, of those with key == T, the lowest indices that complete k (cumulative sums give each
chosen index its output slot). The chosen set equals torch.topk's up to the choice among equal
scores; unlike torch.topk the indices come in ascending index order, not by score. Rows longer
than `MAX_PARTITIONS` fall back to the torch reference. Scores must not be NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PARTITIONS = 8192
"""Longest row the kernel holds in registers; longer rows use `partition_topk_ref`."""


def partition_topk_ref(
    scores: torch.Tensor,  # [B, H, P] float32, -inf = not selectable
    k: torch.Tensor,  # [B, H] int  partitions to choose in each row (<= K)
    num_out: int,  # K
    lengths: torch.Tensor | None = None,  # [B] int64: partitions >= lengths[b] not selectable
    starts: torch.Tensor | None = None,  # [B] int64: partitions < starts[b] not selectable
) -> torch.Tensor:  # [B, H, K] int64, -1 = unused
    """The best min(k, finite scores) partitions of each row by torch.topk, -1 padded."""
    p = torch.arange(scores.shape[-1], device=scores.device)
    if lengths is not None:
        scores = scores.masked_fill(p >= lengths[:, None, None], float("-inf"))
    if starts is not None:
        scores = scores.masked_fill(p < starts[:, None, None], float("-inf"))
    kk = min(num_out, scores.shape[-1])
    values, top = scores.topk(kk, dim=-1)  # [B, H, kk], best first
    rank = torch.arange(kk, device=scores.device)
    keep = (rank < k[..., None]) & (values > -torch.inf)
    chosen = torch.where(keep, top, -1)
    return torch.nn.functional.pad(chosen, (0, num_out - kk), value=-1)


@triton.jit
def _topk_row(
    row_ptr,  # this row's scores
    out_row,  # this row's output
    start,  # partitions to read: [start, length) (the rest count as -inf)
    length,
    want,  # partitions to choose
    NUM_OUT,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)
    x = tl.load(row_ptr + p, mask=(p >= start) & (p < length), other=float("-inf"))  # [BLOCK_P]
    valid = x > float("-inf")
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order = float order
    want = tl.minimum(tl.minimum(want, NUM_OUT), tl.sum(valid.to(tl.int32), 0))

    # bisection for T = the want-th largest key: count(key >= lo) >= want > count(key > hi)
    lo = tl.min(tl.where(valid, key, 2147483647), 0).to(tl.int64)
    hi = tl.max(tl.where(valid, key, -2147483648), 0).to(tl.int64)
    for _ in range(32):  # the key range spans at most 2^32 values
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32), 0) >= want
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = key > lo  # every key above T is chosen (fewer than want of them)
    tie = key == lo
    room = want - tl.sum(above.to(tl.int32), 0)  # ties to take, lowest index first
    # with want = 0, room = 0 takes nothing; with no valid score, `valid` takes nothing
    chosen = (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))) & valid
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1  # output position of each chosen index
    tl.store(out_row + slot, p.to(tl.int64), mask=chosen & (slot < NUM_OUT))  # slot < want
    r = tl.arange(0, BLOCK_K)
    tl.store(out_row + r, tl.full([BLOCK_K], -1, tl.int64), mask=(r >= want) & (r < NUM_OUT))


@triton.jit
def _partition_topk_kernel(
    scores_ptr,
    k_ptr,
    lengths_ptr,  # [B] int64, or any pointer without HAS_LENGTHS
    starts_ptr,  # [B] int64, or any pointer without HAS_STARTS
    out_ptr,
    stride_sb,
    stride_sh,
    stride_kb,
    stride_kh,
    stride_ob,
    stride_oh,
    NUM_PARTITIONS,
    NUM_OUT,
    HAS_LENGTHS: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    BLOCK_P: tl.constexpr,  # >= NUM_PARTITIONS, >= 128
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row_ptr = scores_ptr + b * stride_sb + h * stride_sh
    out_row = out_ptr + b * stride_ob + h * stride_oh
    want = tl.load(k_ptr + b * stride_kb + h * stride_kh).to(tl.int32)
    length = NUM_PARTITIONS
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(lengths_ptr + b), NUM_PARTITIONS).to(tl.int32)
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + b).to(tl.int32)
    # the row's length picks the register block at run time: a short row beside a long one
    # (or in a table padded wide) costs its own length, and one compiled kernel serves all
    if length <= BLOCK_P // 8:
        _topk_row(row_ptr, out_row, start, length, want, NUM_OUT, BLOCK_P // 8, BLOCK_K)
    elif length <= BLOCK_P // 2:
        _topk_row(row_ptr, out_row, start, length, want, NUM_OUT, BLOCK_P // 2, BLOCK_K)
    else:
        _topk_row(row_ptr, out_row, start, length, want, NUM_OUT, BLOCK_P, BLOCK_K)


def partition_topk(
    scores: torch.Tensor,  # [B, H, P] float32, last dim contiguous, -inf = not selectable
    k: torch.Tensor,  # [B, H] int32/int64 (any strides, e.g. an expanded [B])
    num_out: int,  # K
    lengths: torch.Tensor | None = None,  # [B] int64 contiguous: rows end there (not read past)
    starts: torch.Tensor | None = None,  # [B] int64 contiguous: rows begin there (not read before)
) -> torch.Tensor:  # [B, H, K] int64, -1 = unused
    """Triton version of `partition_topk_ref` (same set of indices up to ties, ascending).
    One compiled kernel serves every row length up to the scores' width: a row at most 1/8
    (1/2) of the block wide runs in a block of that size, so with `lengths` a row costs about
    its own length, however wide the (e.g. CUDA-graph-fixed) score tensor is; with `starts` the
    partitions before a row's start are not read either (no masked copy of the scores needed)."""
    assert scores.dim() == 3 and scores.dtype == torch.float32 and scores.stride(-1) == 1
    b, h, num_partitions = scores.shape
    assert k.shape == (b, h) and k.dtype in (torch.int32, torch.int64)
    assert k.device == scores.device and num_out >= 0
    for bound in (lengths, starts):
        if bound is not None:
            assert bound.shape == (b,) and bound.dtype == torch.int64 and bound.is_contiguous()
    if num_partitions > MAX_PARTITIONS:
        return partition_topk_ref(scores, k, num_out, lengths, starts)
    out = torch.empty(b, h, num_out, dtype=torch.int64, device=scores.device)
    if out.numel() == 0:
        return out
    _partition_topk_kernel[(b, h)](
        scores,
        k,
        k if lengths is None else lengths,
        k if starts is None else starts,
        out,
        scores.stride(0),
        scores.stride(1),
        k.stride(0),
        k.stride(1),
        out.stride(0),
        out.stride(1),
        num_partitions,
        num_out,
        HAS_LENGTHS=lengths is not None,
        HAS_STARTS=starts is not None,
        BLOCK_P=triton.next_power_of_2(max(num_partitions, 128)),
        BLOCK_K=triton.next_power_of_2(max(num_out, 16)),
        num_warps=8 if num_partitions > 2048 else 4,
    )
    return out
