"""Prefill attention of one sequence's chunk over its paged KV, on FlashAttention-class kernels.

A chunk of n new tokens at the end of a context of T = prefix + n tokens attends causally with
the query rows aligned to the bottom right: query i sees keys j <= i + prefix.

- No prefix: torch SDPA with is_causal on the chunk's own K/V (cuDNN's kernel on Hopper).
- A prefix, on CUDA in fp16/bf16: the prefix part needs no mask and the chunk part is a square
  causal block, so each runs on cuDNN's fast path; both return their log-sum-exp and are merged
  like the decode kernel's splits (measured on an H200: 1.7x the rate of the next option).
- Otherwise: SDPA with `causal_lower_right`, which runs FlashAttention-2 (an explicit boolean
  mask would drop to a kernel about half as fast, see DESIGN.md §5).

The context is first gathered from its pages into one contiguous [T, Hkv, D] copy: 2 T Hkv D
elements of copying against 4 n T Hq D flops of attention, under 1% of the time for chunks of
a few thousand tokens.

Every SDPA call gets q, k and v as views of contiguous token-major ([1, L, H, D], "BSHD")
tensors: with PyTorch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, cuDNN then keys its plans on
power-of-two lengths instead of building a new one (~50 ms on the H200) for every new prefix
length; it falls back to the per-shape plans for any other layout. A chunk's q (and its own k/v
without a prefix) are views of the fused QKV projection, so they are copied (a few MB). The
engine turns that setting on (`reuse_cudnn_plans_across_lengths`); measured on the H200, a
64K prompt's prefill beside 2 decodes went from 488 to 451 ms per step (the ~50 ms plan build
gone) for kernels ~4% slower, with the same error against the fp32 reference (bench/RESULTS.md).

`prefill_attention` is the part after the gather, for a context already gathered (the SPIN
cache's prefill slots), taken as [Hkv, T, D] views of token-major K/V. References:
`paged_prefill_attention_ref` and `prefill_attention_ref` in paged_attention_ref.py.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_cudnn_attention
from torch.nn.attention.bias import causal_lower_right

from spin_ray.kernels.paged_attention_ref import gather_pages

AVOID_RECOMPILE_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def reuse_cudnn_plans_across_lengths() -> None:
    """Sets PyTorch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 unless the environment sets it already
    (to 0 to opt out). PyTorch reads it once, at the process's first cuDNN SDPA call, so this
    must run before the first prefill; its "experimental" warning is silenced as expected."""
    os.environ.setdefault(AVOID_RECOMPILE_ENV, "1")
    warnings.filterwarnings("ignore", message=f"{AVOID_RECOMPILE_ENV}=1 is currently experimental")


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
    semantics as `paged_prefill_attention_ref`, computed in the input dtype."""
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
    if context_len == n and k_new is not None and v_new is not None:
        k, v = k_new, v_new  # [n, Hkv, D]
    else:
        k = gather_pages(k_cache, pages, context_len)  # [T, Hkv, D]
        v = gather_pages(v_cache, pages, context_len)
    return prefill_attention(q, k.transpose(0, 1), v.transpose(0, 1), scale)


def prefill_attention(
    q: torch.Tensor,  # [n, Hq, D]  the last n of the T positions
    k: torch.Tensor,  # [Hkv, T, D]  keys of every position (a view of [T, Hkv, D]: no copy)
    v: torch.Tensor,  # [Hkv, T, D]
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    """Causal attention of a chunk (the last n positions) over a context already gathered
    ([Hkv, T, D] views); `paged_prefill_attention` after its gather. Reference:
    `prefill_attention_ref`."""
    n, num_heads, _ = q.shape
    num_kv_heads, context_len, _ = k.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k/v dtype {k.dtype}/{v.dtype} != q dtype {q.dtype}")
    if not 1 <= n <= context_len:
        raise ValueError(f"context {context_len} must be >= the chunk length {n} >= 1")
    prefix = context_len - n
    qt = q.contiguous().transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D], BSHD underneath
    kt = _token_major(k).unsqueeze(0)  # [1, Hkv, T, D], BSHD underneath
    vt = _token_major(v).unsqueeze(0)
    gqa = num_heads != num_kv_heads
    if prefix == 0:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa
        )
    elif _cudnn_takes(qt, kt[:, :, :prefix], vt[:, :, :prefix], gqa):
        out = _prefix_and_chunk(qt, kt, vt, prefix, scale)
    else:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=causal_lower_right(n, context_len), scale=scale, enable_gqa=gqa
        )
    return out[0].transpose(0, 1)  # [n, Hq, D]


def merge_by_lse(
    out_a: torch.Tensor,  # [..., n, D]  attention over one part of the keys
    lse_a: torch.Tensor,  # [..., n]     its natural-log log-sum-exp of the scores
    out_b: torch.Tensor,  # [..., n, D]  over the other part
    lse_b: torch.Tensor,  # [..., n]
) -> torch.Tensor:  # [..., n, D] in out_a's dtype: attention over both parts
    """Combine two softmax-attention results over disjoint key sets (computed in fp32)."""
    lse_a, lse_b = lse_a.float().unsqueeze(-1), lse_b.float().unsqueeze(-1)
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * (lse_a - lse).exp() + out_b.float() * (lse_b - lse).exp()
    return out.to(out_a.dtype)


def _token_major(
    x: torch.Tensor,  # [H, L, D]
) -> torch.Tensor:  # [H, L, D]: a view of a contiguous [L, H, D] (no copy if it already is one)
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def _cudnn_takes(q, k, v, gqa: bool) -> bool:
    """cuDNN's SDPA kernel accepts these (CUDA, fp16/bf16, supported head size, enabled)."""
    return q.is_cuda and can_use_cudnn_attention(SDPAParams(q, k, v, None, 0.0, False, gqa))


def _prefix_and_chunk(
    q: torch.Tensor,  # [1, Hq, n, D]
    k: torch.Tensor,  # [1, Hkv, T, D]  prefix, then the chunk's own n keys
    v: torch.Tensor,  # [1, Hkv, T, D]
    prefix: int,
    scale: float,
) -> torch.Tensor:  # [1, Hq, n, D]
    """Attention over the prefix (no mask) and over the chunk (square causal), both on cuDNN,
    merged by log-sum-exp."""
    n = q.shape[2]
    out_prefix, lse_prefix = _cudnn_attention(q, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    out_chunk, lse_chunk = _cudnn_attention(q, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    return merge_by_lse(
        out_prefix, lse_prefix.reshape(1, -1, n), out_chunk, lse_chunk.reshape(1, -1, n)
    )


def _cudnn_attention(q, k, v, causal: bool, scale: float):
    """(out [1, Hq, n, D], LSE) from cuDNN's SDPA kernel, which F.scaled_dot_product_attention
    runs without returning the LSE (GQA: cuDNN takes Hkv < Hq heads as they are)."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    return res[0], res[1]
