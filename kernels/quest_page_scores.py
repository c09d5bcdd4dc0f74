"""Quest page scores: for each sequence, KV head and page, the largest over the group's query
heads of Σ_d max(q_d · kmax_d, q_d · kmin_d) — an upper bound of q·k for every key in the page.

Summaries are indexed by CPU-tier page id, so one launch scores every page of every sequence
through its page table (no per-request loop); the runtime then takes the top-k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def quest_page_scores_ref(
    q: torch.Tensor,  # [B, Hq, D]
    kmin: torch.Tensor,  # [P, Hkv, D]  elementwise min of each page's keys
    kmax: torch.Tensor,  # [P, Hkv, D]
    page_table: torch.Tensor,  # [B, maxp] int  page ids
    num_pages: torch.Tensor | None = None,  # [B] int  pages of each sequence (None: maxp)
) -> torch.Tensor:  # [B, Hkv, maxp] float32
    """Score of every page of each sequence; -inf past its `num_pages` (slots the table pads)."""
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, 1, d)  # [B, Hkv, G, 1, D]
    pages = page_table.long()
    lo = kmin[pages].float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, maxp, D]
    hi = kmax[pages].float().permute(0, 2, 1, 3)[:, :, None]
    scores = torch.maximum(qg * hi, qg * lo).sum(-1).amax(2)  # [B, Hkv, maxp]
    if num_pages is None:
        return scores
    slot = torch.arange(pages.shape[1], device=scores.device)  # [maxp]
    past = slot >= num_pages.to(scores.device)[:, None]  # [B, maxp]
    return scores.masked_fill(past[:, None, :], float("-inf"))


@triton.jit
def _quest_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    table_ptr,
    num_pages_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_tb,
    stride_ob,
    stride_oh,
    MAX_PAGES,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_P
    p = first + tl.arange(0, BLOCK_P)
    p_mask = p < MAX_PAGES
    num_pages = tl.load(num_pages_ptr + b)
    out_row = out_ptr + b * stride_ob + h * stride_oh
    if first < num_pages:
        d = tl.arange(0, BLOCK_D)
        live = p_mask & (p < num_pages)
        d_mask = d < HEAD_DIM
        pages = tl.load(table_ptr + b * stride_tb + p, mask=live, other=0).to(tl.int64)
        off = (pages * NUM_KV_HEADS + h)[:, None] * HEAD_DIM + d[None, :]
        mask = live[:, None] & d_mask[None, :]
        lo = tl.load(kmin_ptr + off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_D]
        hi = tl.load(kmax_ptr + off, mask=mask, other=0.0).to(tl.float32)
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qg = tl.load(q_ptr + b * stride_qb + (h * GROUP + g) * stride_qh + d, mask=d_mask)
            qg = qg.to(tl.float32)[None, :]
            best = tl.maximum(best, tl.sum(tl.maximum(qg * hi, qg * lo), 1))
        tl.store(out_row + p, tl.where(live, best, float("-inf")), mask=p_mask)
    else:  # wholly past the sequence's end (graph padding rows, a table wider than the row)
        # only the -inf fill: the scoring's math would cost almost as much as a live block's
        tl.store(out_row + p, tl.full([BLOCK_P], float("-inf"), tl.float32), mask=p_mask)


def quest_page_scores(
    q: torch.Tensor,  # [B, Hq, D]
    kmin: torch.Tensor,  # [P, Hkv, D] contiguous
    kmax: torch.Tensor,  # [P, Hkv, D] contiguous
    page_table: torch.Tensor,  # [B, maxp] int32/int64
    num_pages: torch.Tensor | None = None,  # [B] int64 (None: maxp)
    block_pages: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:  # [B, Hkv, maxp] float32
    """Triton version of `quest_page_scores_ref`: a sequence's pages past its end (the table's
    padding to a shared, bucketed width) are not read, so a short sequence beside a long one
    costs its own pages only. One program per `block_pages` pages of a (sequence, KV head);
    other blocks and warps, timed at the bench's shape: bench/RESULTS.md, "Kernel launch
    variants"."""
    b, hq, d = q.shape
    _, hkv, dk = kmin.shape
    assert dk == d and hq % hkv == 0 and q.stride(-1) == 1
    assert kmax.shape == kmin.shape and kmin.is_contiguous() and kmax.is_contiguous()
    assert page_table.dim() == 2 and page_table.shape[0] == b and page_table.stride(1) == 1
    max_pages = page_table.shape[1]
    out = torch.empty(b, hkv, max_pages, dtype=torch.float32, device=q.device)
    if b == 0 or max_pages == 0:
        return out
    if num_pages is None:
        num_pages = torch.full((b,), max_pages, dtype=torch.int64, device=q.device)
    _quest_kernel[(b, hkv, triton.cdiv(max_pages, block_pages))](
        q,
        kmin,
        kmax,
        page_table,
        num_pages,
        out,
        q.stride(0),
        q.stride(1),
        page_table.stride(0),
        out.stride(0),
        out.stride(1),
        max_pages,
        NUM_KV_HEADS=hkv,
        GROUP=hq // hkv,
        HEAD_DIM=d,
        BLOCK_P=block_pages,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=num_warps,
    )
    return out
