"""Paged decode attention in Triton: split-K flash-decoding, GQA-aware.

One query token per sequence attends to the sequence's whole paged KV. The KV blocks of a
sequence are dealt out round-robin to `num_splits` programs per (sequence, KV head); each program
serves every query head of its KV group at once, so each K/V page is read from HBM once per group.
Each split writes a normalised partial output and its log-sum-exp; a second small kernel merges
the splits. With one split the first kernel writes the output directly.

Reference: `paged_decode_attention_ref` in paged_attention_ref.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from spin_ray.kernels.split_merge import INTERPRETED, LOG2E, dot_fp32, merge_splits

_FALLBACK_NUM_SMS = 132  # H200; used when the tensors are not on a CUDA device (interpreter)
_PROGRAM_COST_IN_BLOCKS = 2  # a split program's fixed cost (q, partial output, merge) in KV blocks


@dataclass(frozen=True)
class DecodeKernelConfig:
    """Launch parameters of the split kernel (the defaults were picked on an H200, see
    bench/RESULTS.md)."""

    block_n: int = 64
    """KV tokens per loop iteration of one program (a power of two, >= 16)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 3
    """Software-pipelining depth of the K/V loads."""
    programs_per_sm: int = 4
    """Programs resident at once on one multiprocessor, for the num_splits heuristic (the
    default kernel takes 128 registers x 128 threads on Hopper: 4 fit in 64K registers)."""
    min_blocks_per_split: int = 4
    """The heuristic never gives a split fewer KV blocks than this (on the longest sequence)."""
    max_splits: int = 64
    """Upper bound of the heuristic's num_splits."""

    def __post_init__(self):
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        for name in ("programs_per_sm", "min_blocks_per_split", "max_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@triton.jit(do_not_specialize=["num_splits"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [P, S, Hkv, D]
    v_ptr,  # [P, S, Hkv, D]
    page_table_ptr,  # [B, max_pages] int32
    context_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D] (one split) or [B, Hq, num_splits, D] fp32 partials
    lse_ptr,  # [B, Hq, num_splits] fp32, log2 domain (unused with one split)
    scale_log2,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    num_splits,  # programs per (sequence, KV head); a runtime value, so no recompiles
    ONE_SPLIT: tl.constexpr,  # num_splits == 1: write the output directly
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot's minimum)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), None for 16-bit
    UPCAST_DOT: tl.constexpr,  # True only under the interpreter
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h  # [BLOCK_H] query heads of this KV group

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]

    context_len = tl.load(context_lens_ptr + seq)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_pt
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (log2 domain)
    l_sum = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)  # running sum of p @ v
    for block in range(split, tl.cdiv(context_len, BLOCK_N), num_splits):
        tok = block * BLOCK_N + offs_n  # [BLOCK_N]
        t_mask = tok < context_len
        page = tl.load(page_row + tok // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
        in_page = tok % PAGE_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_head + page[:, None] * stride_kp + in_page[:, None] * stride_ks + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        s = dot_fp32(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale_log2  # [BLOCK_H, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_H, BLOCK_N]
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            v_head + page[:, None] * stride_vp + in_page[:, None] * stride_vs + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + dot_fp32(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m = m_new

    has_keys = l_sum > 0.0  # false only for a split that got no block
    out = acc / tl.where(has_keys, l_sum, 1.0)[:, None]
    out_rows = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if ONE_SPLIT:
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:
        tl.store(out_rows + split * stride_os, out, mask=h_mask[:, None] & d_mask[None, :])
        lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _FALLBACK_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context_len: int,
    num_sms: int,
    config: DecodeKernelConfig,
) -> int:
    """The split count of least modelled time. The batch x KV heads x splits programs run in
    waves of `num_sms * programs_per_sm`; each streams ceil(blocks / splits) KV blocks of the
    longest sequence plus a fixed cost, so the time goes as waves x (blocks per program + fixed
    cost): a last wave only partly full costs as much as a full one. Ties go to fewer splits;
    no split gets fewer than `min_blocks_per_split` blocks."""
    programs = batch * num_kv_heads
    blocks = -(-max_context_len // config.block_n)
    slots = num_sms * config.programs_per_sm
    most = max(1, min(config.max_splits, blocks // config.min_blocks_per_split))

    def modelled_time(splits: int) -> tuple[int, int]:
        waves = -(-programs * splits // slots)
        return waves * (-(-blocks // splits) + _PROGRAM_COST_IN_BLOCKS), splits

    return min(range(1, most + 1), key=modelled_time)


def decode_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context_len: int,
    device: torch.device,
    config: DecodeKernelConfig | None = None,
) -> int:
    """`choose_num_splits` for the multiprocessors of `device` (the kernel's default)."""
    config = config or DecodeKernelConfig()
    return choose_num_splits(batch, num_kv_heads, max_context_len, _num_sms(device), config)


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [P, S, Hkv, D]
    v_cache: torch.Tensor,  # [P, S, Hkv, D]
    page_table: torch.Tensor,  # [B, max_pages] int32
    context_lens: torch.Tensor,  # [B] int32, each >= 1
    scale: float,
    num_splits: int | None = None,
    max_context_len: int | None = None,
    config: DecodeKernelConfig | None = None,
    out: torch.Tensor | None = None,  # [B, Hq, D] to write into; default a new tensor
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of one query token per sequence over its paged KV; same semantics as
    `paged_decode_attention_ref`. `num_splits` defaults to a heuristic fed by
    `max_context_len` (default: the page table's capacity); it does not change the result
    beyond rounding."""
    config = config or DecodeKernelConfig()
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [P, S, Hkv, D], got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q heads {num_heads} not a multiple of KV heads {num_kv_heads}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache, v_cache must share one of {_SUPPORTED_DTYPES}, got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.dtype != torch.int32:
        raise ValueError(
            f"page_table must be [B={batch}, max_pages] int32, got {tuple(page_table.shape)} "
            f"{page_table.dtype}"
        )
    if context_lens.shape != (batch,) or context_lens.dtype != torch.int32:
        raise ValueError(
            f"context_lens must be [B={batch}] int32, got {tuple(context_lens.shape)} "
            f"{context_lens.dtype}"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, strides {t.stride()}")
    if page_table.stride(1) != 1 or not context_lens.is_contiguous():
        raise ValueError("page_table rows and context_lens must be contiguous")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim, got "
            f"{tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if num_splits is None:
        if max_context_len is None:
            max_context_len = page_table.shape[1] * page_size
        num_splits = decode_num_splits(batch, num_kv_heads, max_context_len, q.device, config)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    if num_splits == 1:
        part, lse = out, out  # the split kernel writes the output itself; lse is unused
        part_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        part = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device)  # fp32
        lse = torch.empty(batch, num_heads, num_splits, device=q.device)  # fp32
        part_strides = part.stride()[:3]
        lse_strides = lse.stride()[:2]
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        context_lens,
        part,
        lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        page_table.stride(0),
        *part_strides,
        *lse_strides,
        num_splits,
        ONE_SPLIT=num_splits == 1,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        UPCAST_DOT=INTERPRETED,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        merge_splits(part, lse, out)
    return out
