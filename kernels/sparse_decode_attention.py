"""Sparse paged decode attention over per-head page lists (GQA-aware, split-K, LSE merge).

Each sequence b and KV head h attends to its own list of logical pages `pages[b, h, :]`
(-1 = unused), held in the GPU-tier slots `slots[b, h, :]`; a listed page holds
clamp(context_lens[b] - page · S, 0, S) valid tokens (the last page of a sequence may be
partial). The G query heads of a group share the KV head's list. Split-K: programs take disjoint
runs of the list and write a normalised partial output and its log-sum-exp; `merge_splits`
(split_merge.py) combines them, plus any extra partial an algorithm contributes
(e.g. RetroInfer's estimation zone), in a second launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spin_ray.kernels.split_merge import INTERPRETED, LOG2E, dot_fp32, merge_splits


def page_token_counts(
    pages: torch.Tensor,  # [B, H, K] int, -1 = unused
    context_lens: torch.Tensor,  # [B]
    page_size: int,
) -> torch.Tensor:  # [B, H, K] int32
    """Valid tokens of each listed page (the last page of a sequence may be partial)."""
    left = context_lens.long()[:, None, None] - pages.long().clamp(min=0) * page_size
    return torch.where(pages >= 0, left.clamp(0, page_size), 0).int()


def merge_partials(
    m: torch.Tensor,  # [B, Hq, P]  max logit of each partial
    lse_sum: torch.Tensor,  # [B, Hq, P]  Σ exp(logit - m)
    acc: torch.Tensor,  # [B, Hq, P, D]  Σ exp(logit - m) · value
) -> torch.Tensor:  # [B, Hq, D] float32
    """Combine P partial softmax-attention results; empty partials carry m = -inf. A head
    without any key gets 0."""
    m_all = m.amax(-1, keepdim=True)  # [B, Hq, 1]
    m_all = torch.where(torch.isfinite(m_all), m_all, torch.zeros_like(m_all))
    w = torch.exp(m - m_all)  # [B, Hq, P]  (0 for empty partials)
    denom = (w * lse_sum).sum(-1)  # [B, Hq]
    num = (w[..., None] * acc).sum(-2)  # [B, Hq, D]
    return num / torch.where(denom > 0, denom, 1.0)[..., None]


def sparse_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_slots: torch.Tensor,  # [Hkv, Q, S, D]  one layer of the GPU tier
    v_slots: torch.Tensor,  # [Hkv, Q, S, D]
    slots: torch.Tensor,  # [B, Hkv, K] int  slot ids, -1 = unused
    pages: torch.Tensor,  # [B, Hkv, K] int  logical page of each slot, -1 = unused
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Softmax attention of each query head over the valid tokens of its KV head's slots,
    merged with `extra` = (m [B, Hq], sum [B, Hq], acc [B, Hq, D]) when given; fp32 math.
    A head attending nothing gets 0."""
    b, hq, d = q.shape
    hkv, _, s, _ = k_slots.shape
    g = hq // hkv
    counts = page_token_counts(pages, context_lens, s)  # [B, Hkv, K]
    safe = slots.clamp(min=0).long()  # [B, Hkv, K]
    heads = torch.arange(hkv, device=q.device)[None, :, None]
    k = k_slots[heads, safe].float().flatten(2, 3)  # [B, Hkv, K*S, D]
    v = v_slots[heads, safe].float().flatten(2, 3)
    valid = torch.arange(s, device=q.device) < counts[..., None]  # [B, Hkv, K, S]
    valid = (valid & (slots >= 0)[..., None]).flatten(2, 3)  # [B, Hkv, K*S]
    v = v.masked_fill(~valid[..., None], 0.0)  # rows past a page's count are never read
    qg = q.float().view(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale  # [B, Hkv, G, T]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    m = logits.amax(-1)  # [B, Hkv, G]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m_safe[..., None])
    parts_m = m.reshape(b, hq, 1)
    parts_l = p.sum(-1).reshape(b, hq, 1)
    parts_acc = torch.einsum("bhgt,bhtd->bhgd", p, v).reshape(b, hq, 1, d)
    if extra is not None:
        em, el, eacc = extra
        parts_m = torch.cat([parts_m, em.float()[..., None]], -1)
        parts_l = torch.cat([parts_l, el.float()[..., None]], -1)
        parts_acc = torch.cat([parts_acc, eacc.float()[:, :, None]], -2)
    return merge_partials(parts_m, parts_l, parts_acc).to(q.dtype)


@triton.jit
def _partial_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [Hkv, Q, S, D]
    v_ptr,  # [Hkv, Q, S, D]
    slots_ptr,  # [B, Hkv, K] contiguous
    pages_ptr,  # [B, Hkv, K] contiguous
    context_lens_ptr,  # [B]
    part_ptr,  # [B, Hq, NUM_SPLITS, D] fp32 normalised partial outputs
    lse_ptr,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    scale_log2,  # softmax scale · log2(e)
    stride_qb,
    stride_qh,
    stride_kh,
    stride_kq,
    NUM_ENTRIES,
    ENTRIES_PER_SPLIT,
    NUM_SPLITS,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), None for 16-bit
    UPCAST_DOT: tl.constexpr,  # True only under the interpreter
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, PAGE_SIZE)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q_rows = q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_rows, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BG, BD]
    q = q.to(k_ptr.dtype.element_ty)
    context_len = tl.load(context_lens_ptr + b).to(tl.int64)
    entries = (b * tl.num_programs(1) + h) * NUM_ENTRIES
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running Σ exp2(s - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running Σ p · v
    start = split * ENTRIES_PER_SPLIT
    end = tl.minimum(start + ENTRIES_PER_SPLIT, NUM_ENTRIES)
    for j in range(start, end):
        slot = tl.load(slots_ptr + entries + j).to(tl.int64)
        page = tl.load(pages_ptr + entries + j).to(tl.int64)
        count = tl.minimum(tl.maximum(context_len - page * PAGE_SIZE, 0), PAGE_SIZE)
        if (slot >= 0) & (page >= 0) & (count > 0):
            base = h * stride_kh + slot * stride_kq
            kv_off = base + t[:, None] * HEAD_DIM + d[None, :]
            kv_mask = (t[:, None] < count) & d_mask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [S, BD]
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            if USE_DOT:
                s = dot_fp32(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale_log2  # [BG, S]
            else:
                s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2)
                s = s * scale_log2
            s = tl.where((t < count)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])  # [BG, S]
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_DOT:
                pv = dot_fp32(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    has_keys = l_i > 0.0  # false for a split whose entries are all unused
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    # partial index of (b, query head h*GROUP+g, split): [B, Hq, P] layout
    part = ((b * tl.num_programs(1) * GROUP) + h * GROUP + g) * NUM_SPLITS + split
    tl.store(lse_ptr + part, lse, mask=g_mask)
    out_mask = g_mask[:, None] & d_mask[None, :]
    tl.store(part_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)


def sparse_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_slots: torch.Tensor,  # [Hkv, Q, S, D] contiguous
    v_slots: torch.Tensor,  # [Hkv, Q, S, D] contiguous
    slots: torch.Tensor,  # [B, Hkv, K] int32/int64 contiguous, -1 = unused
    pages: torch.Tensor,  # [B, Hkv, K] int32/int64 contiguous, -1 = unused
    context_lens: torch.Tensor,  # [B] int32/int64 contiguous
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    entries_per_split: int = 4,
) -> torch.Tensor:  # [B, Hq, D]
    """Triton version of `sparse_decode_attention_ref`: two launches (split partials, merge),
    no host sync, no data-dependent allocation (CUDA-graph safe). A program walks
    `entries_per_split` pages one after another, each iteration waiting for its page's loads,
    so short runs (4) put more programs beside each other; the merge reads one partial per run."""
    b, hq, d = q.shape
    hkv, _, page_size, head_dim = k_slots.shape
    assert head_dim == d and hq % hkv == 0 and q.stride(-1) == 1
    assert v_slots.shape == k_slots.shape and k_slots.is_contiguous() and v_slots.is_contiguous()
    assert slots.shape == pages.shape and slots.shape[:2] == (b, hkv)
    assert slots.is_contiguous() and pages.is_contiguous()
    assert context_lens.shape == (b,) and context_lens.is_contiguous()
    assert page_size & (page_size - 1) == 0, "page_size must be a power of two"
    group = hq // hkv
    num_entries = slots.shape[2]
    num_splits = max(1, triton.cdiv(num_entries, entries_per_split))
    part = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    _partial_kernel[(b, hkv, num_splits)](
        q,
        k_slots,
        v_slots,
        slots,
        pages,
        context_lens,
        part,
        lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_slots.stride(0),
        k_slots.stride(1),
        num_entries,
        entries_per_split,
        num_splits,
        GROUP=group,
        PAGE_SIZE=page_size,
        HEAD_DIM=d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        USE_DOT=page_size >= 16 and block_d == d and d >= 16,
        DOT_PRECISION="ieee" if k_slots.dtype == torch.float32 else None,
        UPCAST_DOT=INTERPRETED,
    )
    return merge_splits(part, lse, torch.empty_like(q), extra)
