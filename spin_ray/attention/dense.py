"""Dense paged attention: every token attends to its sequence's whole KV (the baseline)."""

from __future__ import annotations

import torch

from spin_ray.attention.backend import AttentionBackend
from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.cache.kv_cache import KVCache
from spin_ray.kernels.paged_attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    store_kv_ref,
)


class DenseAttentionBackend(AttentionBackend):
    """Stores K/V in the paged cache; decode tokens go through the paged decode kernel (Triton
    on CUDA, torch reference on CPU), prefill chunks through SDPA over their gathered pages."""

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.meta: AttentionMetadata | None = None
        self.use_triton = kv_cache.k[0].is_cuda

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta

    def forward(self, layer_idx, q, k, v, scale):
        meta = self.meta
        assert meta is not None, "plan() must be called before forward()"
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        self._store(k_cache, v_cache, k, v, meta.slot_mapping)
        if meta.is_decode_only:
            return self._decode(q, k_cache, v_cache, meta.page_table, meta.context_lens, scale)
        out = torch.empty_like(q)  # [N, Hq, D]
        start = 0
        for b, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
            pages = meta.page_table[b, : -(-ctx // meta.page_size)]
            out[start : start + n] = paged_prefill_attention_ref(
                q[start : start + n], k_cache, v_cache, pages, ctx, scale
            )
            start += n
        return out

    def _store(self, k_cache, v_cache, k, v, slot_mapping):
        if self.use_triton:
            from spin_ray.kernels.kv_store import store_kv

            store_kv(k_cache, v_cache, k, v, slot_mapping)
        else:
            store_kv_ref(k_cache, v_cache, k, v, slot_mapping)

    def _decode(self, q, k_cache, v_cache, page_table, context_lens, scale):
        if self.use_triton:
            from spin_ray.kernels.paged_decode_attention import paged_decode_attention

            return paged_decode_attention(q, k_cache, v_cache, page_table, context_lens, scale)
        return paged_decode_attention_ref(q, k_cache, v_cache, page_table, context_lens, scale)
