"""Prefill attention of one sequence's chunk over its paged KV, on the FlashAttention path.

A chunk of n new tokens at the end of a context of T tokens attends causally with the query
rows aligned to the bottom right: query i sees keys j <= i + (T - n). torch SDPA runs that
alignment on its FlashAttention kernel through `causal_lower_right` (an explicit boolean mask
would drop it to a kernel about half as fast, see DESIGN.md §5). The prefix is gathered from its
pages into one contiguous [T, Hkv, D] copy first: T * Hkv * D * 2 elements of copying against
4 * n * T * Hq * D flops of attention, under 1% of the time for chunks of a few thousand tokens.

Reference: `paged_prefill_attention_ref` in paged_attention_ref.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spin_ray.kernels.paged_attention_ref import gather_pages
from torch.nn.attention.bias import causal_lower_right


def paged_prefill_attention(
    q: torch.Tensor,  # [n, Hq, D]  the new tokens of one sequence
    k_cache: torch.Tensor,  # [P, S, Hkv, D]  already holding the new tokens' K/V
    v_cache: torch.Tensor,  # [P, S, Hkv, D]
    pages: torch.Tensor,  # [n_pages] int  the sequence's pages, in order
    context_len: int,  # prefix + n
    scale: float,
    k_new: torch.Tensor | None = None,  # [n, Hkv, D]  the new tokens' K, to skip the gather
    v_new: torch.Tensor | None = None,  # [n, Hkv, D]  when there is no prefix
) -> torch.Tensor:  # [n, Hq, D]
    """Causal attention of a chunk of n new tokens over the sequence's whole stored KV; same
    semantics as `paged_prefill_attention_ref`, computed in the input dtype by SDPA."""
    n, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1:3]
    if not 1 <= n <= context_len:
        raise ValueError(f"context_len {context_len} must be >= the chunk length {n} >= 1")
    if pages.numel() * page_size < context_len:
        raise ValueError(f"{pages.numel()} pages of {page_size} cannot hold {context_len} tokens")
    if num_heads % num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"q [n, {num_heads}, {head_dim}] does not fit KV heads [{num_kv_heads}, "
            f"{k_cache.shape[3]}]"
        )
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    no_prefix = context_len == n and k_new is not None and v_new is not None
    if no_prefix and (k_new.dtype != q.dtype or v_new.dtype != q.dtype):
        raise ValueError(f"k_new/v_new dtype {k_new.dtype}/{v_new.dtype} != q dtype {q.dtype}")
    if no_prefix:
        k, v = k_new, v_new  # [n, Hkv, D]
    else:
        k = gather_pages(k_cache, pages, context_len)  # [T, Hkv, D]
        v = gather_pages(v_cache, pages, context_len)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, Hq, n, D]
        k.transpose(0, 1).unsqueeze(0),  # [1, Hkv, T, D]
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=None if context_len == n else causal_lower_right(n, context_len),
        is_causal=context_len == n,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [1, Hq, n, D]
    return out[0].transpose(0, 1)
