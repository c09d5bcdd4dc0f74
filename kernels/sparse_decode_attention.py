"""Sparse paged decode attention over per-head page lists (GQA-aware, split-K, LSE merge).

Each sequence b and KV head h attends to its own list of GPU-tier slots `slots[b, h, :]`
(-1 = unused) holding `counts[b, h, j]` valid tokens each. The G query heads of a group share
the KV head's list. Split-K: programs take disjoint runs of the list and write partial
(max logit, sum of exp, weighted values); `merge_partials` combines them, plus any extra
partial an algorithm contributes (e.g. RetroInfer's estimation zone), by log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def merge_partials(
    m: torch.Tensor,  # [B, Hq, P]  max logit of each partial
    lse_sum: torch.Tensor,  # [B, Hq, P]  Σ exp(logit - m)
    acc: torch.Tensor,  # [B, Hq, P, D]  Σ exp(logit - m) · value
) -> torch.Tensor:  # [B, Hq, D] float32
    """Combine P partial softmax-attention results; empty partials carry m = -inf."""
    m_all = m.amax(-1, keepdim=True)  # [B, Hq, 1]
    m_all = torch.where(torch.isfinite(m_all), m_all, torch.zeros_like(m_all))
    w = torch.exp(m - m_all)  # [B, Hq, P]  (0 for empty partials)
    denom = (w * lse_sum).sum(-1)  # [B, Hq]
    num = (w[..., None] * acc).sum(-2)  # [B, Hq, D]
    return num / denom[..., None]


def sparse_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_slots: torch.Tensor,  # [Hkv, Q, S, D]  one layer of the GPU tier
    v_slots: torch.Tensor,  # [Hkv, Q, S, D]
    slots: torch.Tensor,  # [B, Hkv, K] int  slot ids, -1 = unused
    counts: torch.Tensor,  # [B, Hkv, K] int  valid tokens in each slot (0 for unused)
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Softmax attention of each query head over the valid tokens of its KV head's slots,
    merged with `extra` = (m [B, Hq], sum [B, Hq], acc [B, Hq, D]) when given; fp32 math."""
    b, hq, d = q.shape
    hkv, _, s, _ = k_slots.shape
    g = hq // hkv
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
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    counts_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_kh,
    stride_kq,
    stride_sb,
    stride_sh,
    NUM_ENTRIES,
    ENTRIES_PER_SPLIT,
    NUM_SPLITS,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
    q = tl.load(q_rows, mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * ENTRIES_PER_SPLIT
    end = tl.minimum(start + ENTRIES_PER_SPLIT, NUM_ENTRIES)
    for j in range(start, end):
        slot = tl.load(slots_ptr + b * stride_sb + h * stride_sh + j).to(tl.int64)
        count = tl.load(counts_ptr + b * stride_sb + h * stride_sh + j)
        if (slot >= 0) & (count > 0):
            base = h * stride_kh + slot * stride_kq
            kv_off = base + t[:, None] * HEAD_DIM + d[None, :]
            kv_mask = (t[:, None] < count) & d_mask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            if USE_DOT:
                s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=DOT_PRECISION)
                s = s.to(tl.float32) * scale  # [BG, S]
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale
            s = tl.where((t < count)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    # partial index of (b, query head h*GROUP+g, split): [B, Hq, P] layout
    part = ((b * tl.num_programs(1) * GROUP) + h * GROUP + g) * NUM_SPLITS + split
    tl.store(m_ptr + part, m_i, mask=g_mask)
    tl.store(l_ptr + part, l_i, mask=g_mask)
    acc_mask = g_mask[:, None] & d_mask[None, :]
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=acc_mask)


def sparse_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_slots: torch.Tensor,  # [Hkv, Q, S, D] contiguous
    v_slots: torch.Tensor,  # [Hkv, Q, S, D] contiguous
    slots: torch.Tensor,  # [B, Hkv, K] int32/int64, -1 = unused
    counts: torch.Tensor,  # [B, Hkv, K] int32 (same strides as slots)
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    entries_per_split: int = 16,
) -> torch.Tensor:  # [B, Hq, D]
    """Triton version of `sparse_decode_attention_ref`."""
    b, hq, d = q.shape
    hkv, num_slots, page_size, head_dim = k_slots.shape
    assert head_dim == d and hq % hkv == 0 and q.stride(-1) == 1
    assert v_slots.shape == k_slots.shape and k_slots.is_contiguous() and v_slots.is_contiguous()
    assert slots.shape == counts.shape and slots.shape[:2] == (b, hkv)
    assert slots.is_contiguous() and counts.is_contiguous()
    assert page_size & (page_size - 1) == 0, "page_size must be a power of two"
    group = hq // hkv
    num_entries = slots.shape[2]
    num_splits = max(1, triton.cdiv(num_entries, entries_per_split))
    m = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
    block_g = max(16, triton.next_power_of_2(group))
    block_d = triton.next_power_of_2(d)
    use_dot = page_size >= 16 and block_d == d and d >= 16
    _partial_kernel[(b, hkv, num_splits)](
        q,
        k_slots,
        v_slots,
        slots,
        counts,
        m,
        lsum,
        acc,
        scale,
        q.stride(0),
        q.stride(1),
        k_slots.stride(0),
        k_slots.stride(1),
        slots.stride(0),
        slots.stride(1),
        num_entries,
        entries_per_split,
        num_splits,
        GROUP=group,
        PAGE_SIZE=page_size,
        HEAD_DIM=d,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        USE_DOT=use_dot,
        DOT_PRECISION="ieee" if k_slots.dtype == torch.float32 else "tf32",  # no TF32 for fp32
    )
    if extra is not None:
        em, el, eacc = extra
        m = torch.cat([m, em.float()[..., None]], -1)
        lsum = torch.cat([lsum, el.float()[..., None]], -1)
        acc = torch.cat([acc, eacc.float()[:, :, None]], -2)
    return merge_partials(m, lsum, acc).to(q.dtype)
