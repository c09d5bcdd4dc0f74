"""Write the new tokens' K/V into their paged-cache slots, in Triton.

Reference: `store_kv_ref` in paged_attention_ref.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_cache_ptr,  # [P, S, Hkv, D]
    v_cache_ptr,  # [P, S, Hkv, D]
    k_ptr,  # [N, Hkv, D]
    v_ptr,  # [N, Hkv, D]
    slot_mapping_ptr,  # [N] int64: page_id * S + offset; < 0: skip
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_vcp,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    live_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # a negative slot writes nothing
    mask = (offs_h < live_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    page = slot // PAGE_SIZE
    in_page = slot % PAGE_SIZE
    rows = offs_h[:, None]
    cols = offs_d[None, :]
    k = tl.load(
        k_ptr + token * stride_kn + rows * stride_kh + cols, mask=mask
    )  # [BLOCK_H, BLOCK_D]
    v = tl.load(v_ptr + token * stride_vn + rows * stride_vh + cols, mask=mask)
    k_dst = k_cache_ptr + page * stride_kcp + in_page * stride_kcs + rows * stride_kch + cols
    v_dst = v_cache_ptr + page * stride_vcp + in_page * stride_vcs + rows * stride_vch + cols
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k_cache: torch.Tensor,  # [P, S, Hkv, D]
    v_cache: torch.Tensor,  # [P, S, Hkv, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    slot_mapping: torch.Tensor,  # [N] int64, each in [0, P * S), or -1: skip (padding)
) -> None:
    """Write k[i], v[i] into slot `slot_mapping[i]` of the caches (cast to the cache dtype);
    tokens with a negative slot are skipped (padded rows of a CUDA-graph batch); same
    semantics as `store_kv_ref`."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [P, S, Hkv, D], got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"k and v must both be [N, {num_kv_heads}, {head_dim}], got {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )
    num_tokens = k.shape[0]
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be [N={num_tokens}] int64 or int32, got "
            f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, strides {t.stride()}")
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k_cache,
        v_cache,
        k,
        v,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size,
        num_warps=4,
    )
