"""Plain torch references for paged attention: the definition the Triton kernels must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_pages(
    cache: torch.Tensor,  # [P, S, Hkv, D]  one layer's K or V pages
    pages: torch.Tensor,  # [n_pages] int  page ids of one sequence, in order
    length: int,
) -> torch.Tensor:  # [length, Hkv, D]
    """The first `length` tokens stored in `pages`, in sequence order."""
    return cache[pages.long()].flatten(0, 1)[:length]


def store_kv_ref(
    k_cache: torch.Tensor,  # [P, S, Hkv, D]
    v_cache: torch.Tensor,  # [P, S, Hkv, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    slot_mapping: torch.Tensor,  # [N] int64  page_id * S + offset; < 0: skip (padding)
) -> None:
    """Write each new token's K/V into its slot; tokens with a negative slot are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]  one query token per sequence
    k_cache: torch.Tensor,  # [P, S, Hkv, D]
    v_cache: torch.Tensor,  # [P, S, Hkv, D]
    page_table: torch.Tensor,  # [B, max_pages] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """Each query attends to all `context_lens[b]` tokens of its sequence (GQA: query head h
    reads KV head h // (Hq // Hkv)); computed in fp32."""
    page_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        pages = page_table[b, : -(-length // page_size)]
        k = gather_pages(k_cache, pages, length)  # [T, Hkv, D]
        v = gather_pages(v_cache, pages, length)
        out[b] = _attend(q[b : b + 1], k, v, scale, causal_offset=None)[0]
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [n, Hq, D]  the new tokens of one sequence
    k_cache: torch.Tensor,  # [P, S, Hkv, D]
    v_cache: torch.Tensor,  # [P, S, Hkv, D]
    pages: torch.Tensor,  # [n_pages] int  the sequence's pages
    context_len: int,  # prefix + n
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    """Causal attention of a chunk of n new tokens over the sequence's whole stored KV."""
    k = gather_pages(k_cache, pages, context_len)  # [T, Hkv, D]
    v = gather_pages(v_cache, pages, context_len)
    return _attend(q, k, v, scale, causal_offset=context_len - q.shape[0])


def prefill_attention_ref(
    q: torch.Tensor,  # [n, Hq, D]  the last n of the T positions
    k: torch.Tensor,  # [Hkv, T, D]  head-major
    v: torch.Tensor,  # [Hkv, T, D]
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    """Causal attention of a chunk over a context gathered head-major."""
    return _attend(q, k.transpose(0, 1), v.transpose(0, 1), scale, k.shape[1] - q.shape[0])


def _attend(
    q: torch.Tensor,  # [n, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    scale: float,
    causal_offset: int | None,
) -> torch.Tensor:  # [n, Hq, D]
    """SDPA with GQA; query i may see keys j <= i + causal_offset (None: all keys). The inputs
    get a batch dimension of 1: on the CPU only 4-D inputs take SDPA's flash kernel (3-D ones
    take the math path, which holds the [Hq, n, T] scores: 7x slower for a 4K-token prompt).
    A chunk without a prefix (offset 0) passes `is_causal` rather than the mask written out."""
    n = q.shape[0]
    qt = q.transpose(0, 1).float()[None]  # [1, Hq, n, D]
    kt = k.transpose(0, 1).float()[None]  # [1, Hkv, T, D]
    vt = v.transpose(0, 1).float()[None]
    mask = None
    if causal_offset is not None and causal_offset > 0 and n > 1:
        rows = torch.arange(n, device=q.device)[:, None] + causal_offset
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= rows  # [n, T]
    causal = causal_offset == 0 and n > 1
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )[0]  # [Hq, n, D]
    return out.transpose(0, 1).to(q.dtype)
