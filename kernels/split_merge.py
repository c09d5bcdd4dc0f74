"""Split-K softmax attention's shared pieces: the LSE merge of split partials (one launch),
and the dot product the split kernels use (fp32 accumulation; upcast under Triton's CPU
interpreter, which multiplies bf16 bit patterns as integers).

Used by paged_decode_attention.py (dense pages) and sparse_decode_attention.py (per-head page
lists).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
"""log2(e): the split kernels work in the log2 domain (exp2)."""


@triton.jit
def dot_fp32(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: multiply in fp32 (triton's CPU interpreter
    multiplies bf16 bit patterns as integers)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _merge_splits_kernel(
    part_ptr,  # [B, Hq, num_splits, D] fp32 normalised partial outputs
    lse_ptr,  # [B, Hq, num_splits] fp32, log2 domain, -inf for a split without keys
    extra_m_ptr,  # [B, Hq] contiguous: an extra partial's max logit (natural log; HAS_EXTRA)
    extra_l_ptr,  # [B, Hq] contiguous: its Σ exp(logit - m)
    extra_acc_ptr,  # [B, Hq, D] contiguous: its Σ exp(logit - m) · value
    out_ptr,  # [B, Hq, D]
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    num_splits,
    HAS_EXTRA: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(
        lse_ptr + seq * stride_lb + head * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )  # [BLOCK_S]
    part = tl.load(
        part_ptr
        + seq * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    top = tl.max(lse, 0)
    if HAS_EXTRA:
        row = seq * tl.num_programs(1) + head
        extra_m = tl.load(extra_m_ptr + row).to(tl.float32) * 1.4426950408889634  # · log2(e)
        extra_l = tl.load(extra_l_ptr + row).to(tl.float32)
        extra_acc = tl.load(extra_acc_ptr + row * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
        top = tl.maximum(top, extra_m)
    top = tl.where(top == float("-inf"), 0.0, top)  # no keys at all: the output is 0
    weight = tl.exp2(lse - top)  # [BLOCK_S]  splits without keys get 0
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0)  # [BLOCK_D]
    if HAS_EXTRA:
        extra_weight = tl.exp2(extra_m - top)
        total += extra_weight * extra_l
        out += extra_weight * extra_acc.to(tl.float32)
    out = out / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def merge_splits(
    part: torch.Tensor,  # [B, Hq, P, D] fp32 normalised partial outputs, last dim contiguous
    lse: torch.Tensor,  # [B, Hq, P] fp32 their log2-domain log-sum-exp, -inf for no keys
    out: torch.Tensor,  # [B, Hq, D] written, last dim contiguous
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # out
    """Softmax-merge P split partials per (sequence, query head) into `out` (in its dtype), with
    an optional unnormalised extra partial `extra` = (m [B, Hq], Σ exp(logit - m) [B, Hq],
    Σ exp(logit - m) · value [B, Hq, D]) in the natural-log domain. One launch; a head without
    any key gets 0."""
    batch, num_heads, num_splits, head_dim = part.shape
    assert lse.shape == (batch, num_heads, num_splits) and out.shape == (batch, num_heads, head_dim)
    assert part.dtype == lse.dtype == torch.float32
    assert part.stride(-1) == 1 and lse.stride(-1) == 1 and out.stride(-1) == 1
    if extra is not None:
        em, el, eacc = extra
        assert em.shape == el.shape == (batch, num_heads) and eacc.shape == out.shape
        assert em.is_contiguous() and el.is_contiguous() and eacc.is_contiguous()
    else:
        em = el = eacc = lse  # not read
    _merge_splits_kernel[(batch, num_heads)](
        part,
        lse,
        em,
        el,
        eacc,
        out,
        *part.stride()[:3],
        *lse.stride()[:2],
        out.stride(0),
        out.stride(1),
        num_splits,
        HAS_EXTRA=extra is not None,
        BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    return out


INTERPRETED = isinstance(_merge_splits_kernel, InterpretedFunction)
"""Kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1): pass as `dot_fp32`'s UPCAST."""
