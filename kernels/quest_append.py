"""Quest's incremental page summaries: fold a step's new keys into the elementwise min and max
of their pages, in one launch.

Slot s lives on page s // page_size at offset s % page_size; a page whose offset-0 token is in
the step starts afresh (its row may hold a freed page's old keys), any other page folds the new
keys into its row. Padding tokens (slot -1) touch no page.

`quest_append_chunk` does the same for one prefill chunk with whole-page reductions (torch ops,
a few launches whatever the chunk's length); the kernel serves decode steps.

Precondition (the runtime's batches meet it: a step holds each request once and a chunk's slots
are consecutive): the tokens of one page are adjacent in `slots`. The kernel relies on it to
give each page a single writer — the first token of each run of same-page tokens (its leader)
reduces the run and writes the row; everyone else does nothing. So there are no atomics and the
result is deterministic (min and max are exact in any order), equal to `quest_append_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def quest_append_ref(
    kmin: torch.Tensor,  # [P + 1, Hkv, D]  elementwise min of each page's keys; row P: spare
    kmax: torch.Tensor,  # [P + 1, Hkv, D]
    slots: torch.Tensor,  # [N] int64  slot of each token, -1 = padding
    k: torch.Tensor,  # [N, Hkv, D]
    page_size: int,
) -> None:
    """Fold the keys into their pages' summaries in place. Padding tokens write the spare row P
    (so the shapes do not depend on the data); the spare row's contents mean nothing."""
    spare = kmin.shape[0] - 1
    page = torch.where(slots >= 0, slots // page_size, spare)  # [N]
    first = torch.where(slots % page_size == 0, page, spare)  # pages starting afresh
    idx = page[:, None, None].expand_as(k)  # [N, Hkv, D]
    for summary, reduce in ((kmin, "amin"), (kmax, "amax")):
        summary.index_copy_(0, first, k)
        summary.scatter_reduce_(0, idx, k, reduce)


@triton.jit
def _quest_append_kernel(
    kmin_ptr,
    kmax_ptr,
    slots_ptr,
    k_ptr,
    stride_kn,
    stride_kh,
    N,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    page = slot // PAGE_SIZE
    prev = tl.load(slots_ptr + t - 1, mask=t > 0, other=-1)
    leader = (slot >= 0) & ((prev < 0) | (prev // PAGE_SIZE != page))

    # the leader's run: tokens t, t + 1, ... up to the first one off this page (at most
    # PAGE_SIZE); empty for everyone else. Masks are built by comparisons, not by `&` of a block
    # with a scalar bool, which Triton's CPU interpreter mistypes.
    j = tl.arange(0, BLOCK_S)
    tok = t + j  # [BLOCK_S]
    s = tl.load(slots_ptr + tok, mask=tok < N, other=-1)
    same = (tok < N) & (s >= 0) & (s // PAGE_SIZE == page)
    run = j < tl.where(leader, tl.min(tl.where(same, BLOCK_S, j), 0), 0)  # [BLOCK_S]
    fresh = tl.max((run & (s % PAGE_SIZE == 0)).to(tl.int32), 0)  # the page starts afresh

    d = tl.arange(0, BLOCK_D)
    mask = run[:, None] & (d < HEAD_DIM)[None, :]  # [BLOCK_S, BLOCK_D]
    off = tok.to(tl.int64)[:, None] * stride_kn + h * stride_kh + d[None, :]
    keys = tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, keys, float("inf")), 0)  # [BLOCK_D]
    hi = tl.max(tl.where(mask, keys, float("-inf")), 0)

    row = (page * NUM_KV_HEADS + h) * HEAD_DIM + d  # [BLOCK_D]
    write = d < tl.where(leader, HEAD_DIM, 0)  # [BLOCK_D]
    fold = d < tl.where(leader & (fresh == 0), HEAD_DIM, 0)  # fold into the stored row
    lo = tl.minimum(lo, tl.load(kmin_ptr + row, mask=fold, other=float("inf")).to(tl.float32))
    hi = tl.maximum(hi, tl.load(kmax_ptr + row, mask=fold, other=float("-inf")).to(tl.float32))
    tl.store(kmin_ptr + row, lo.to(kmin_ptr.dtype.element_ty), mask=write)
    tl.store(kmax_ptr + row, hi.to(kmax_ptr.dtype.element_ty), mask=write)


def quest_append(
    kmin: torch.Tensor,  # [P + 1, Hkv, D] contiguous
    kmax: torch.Tensor,  # [P + 1, Hkv, D] contiguous
    slots: torch.Tensor,  # [N] int64 contiguous, -1 = padding; a page's tokens adjacent
    k: torch.Tensor,  # [N, Hkv, D], last dim contiguous
    page_size: int,
) -> None:
    """Triton version of `quest_append_ref` (one program per token and KV head; the leader of
    each page's run writes its row). It never writes the spare row, so no host sync and no
    data-dependent shape: safe to capture in a CUDA graph."""
    n, hkv, d = k.shape
    assert kmin.dim() == 3 and kmin.shape[1:] == (hkv, d) and kmax.shape == kmin.shape
    assert kmin.is_contiguous() and kmax.is_contiguous() and k.stride(2) == 1
    assert kmin.dtype == kmax.dtype == k.dtype
    assert slots.shape == (n,) and slots.dtype == torch.int64 and slots.is_contiguous()
    assert page_size >= 1
    if n == 0:
        return
    _quest_append_kernel[(n, hkv)](
        kmin,
        kmax,
        slots,
        k,
        k.stride(0),
        k.stride(1),
        n,
        NUM_KV_HEADS=hkv,
        HEAD_DIM=d,
        PAGE_SIZE=page_size,
        BLOCK_S=triton.next_power_of_2(page_size),
        BLOCK_D=triton.next_power_of_2(d),
    )


def quest_append_chunk(
    kmin: torch.Tensor,  # [P + 1, Hkv, D]
    kmax: torch.Tensor,  # [P + 1, Hkv, D]
    slots: torch.Tensor,  # [n] int64  one request's consecutive positions (no padding)
    k: torch.Tensor,  # [n, Hkv, D]
    page_size: int,
    first_offset: int,  # slots[0] % page_size, known on the host
) -> None:
    """`quest_append_ref` for one prefill chunk: its keys, padded to page boundaries with ±inf,
    reduced per page; the page the chunk starts mid-way folds into its row, every other page
    starts in the chunk and is written afresh. No host synchronisation."""
    n, hkv, d = k.shape
    s = page_size
    num_pages = (first_offset + n + s - 1) // s
    firsts = (torch.arange(num_pages, device=slots.device) * s - first_offset).clamp(min=0)
    pages = slots[firsts] // s  # [p] the page of each page's first token in the chunk
    for summary, fill, reduce, fold in (
        (kmin, float("inf"), torch.amin, torch.minimum),
        (kmax, float("-inf"), torch.amax, torch.maximum),
    ):
        padded = k.new_full((num_pages * s, hkv, d), fill)  # [p * S, Hkv, D]
        padded[first_offset : first_offset + n] = k
        rows = reduce(padded.view(num_pages, s, hkv, d), dim=1)  # [p, Hkv, D]
        if first_offset:
            rows[:1] = fold(rows[:1], summary[pages[:1]])  # (a slice: pages[0] would sync)
        summary[pages] = rows
