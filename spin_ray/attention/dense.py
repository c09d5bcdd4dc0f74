"""Dense paged attention: every token attends to its sequence's whole KV (the baseline)."""

from __future__ import annotations

import torch

from spin_ray.attention.backend import AttentionBackend, GraphKey
from spin_ray.attention.metadata import AttentionMetadata, PrefillChunk, StepSplit
from spin_ray.cache.kv_cache import KVCache
from spin_ray.device.phase_timer import PhaseTimer
from spin_ray.device.step_buffers import bucket, to_device_async
from spin_ray.kernels.paged_attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    store_kv_ref,
)


class DenseAttentionBackend(AttentionBackend):
    """Stores K/V in the paged cache. All sequences with one new token (decode) go through the
    paged decode kernel in one launch; each longer chunk (prefill) attends causally over its
    pages on its own. On CUDA: the Triton store and decode kernels, and FlashAttention-class
    SDPA kernels for prefill (kernels/paged_prefill_attention.py); on the CPU: the torch
    references."""

    supports_cuda_graphs = True

    def __init__(self, kv_cache: KVCache, timer: PhaseTimer | None = None):
        self.kv_cache = kv_cache
        self.meta: AttentionMetadata | None = None
        self.on_cuda = kv_cache.k[0].is_cuda
        self.timer = timer or PhaseTimer(kv_cache.k[0].device, ("attention",))
        """Times decode attention ("attention"); a sparse backend passes its own for the dense
        layers it delegates."""
        self._decode_rows: torch.Tensor | None = None  # [B_dec] int64: decode sequences
        self._decode_tokens: torch.Tensor | None = None  # [B_dec] int64: their packed rows
        self._prefills: list[PrefillChunk] = []
        self._num_splits = 1  # split-K programs of the decode kernel (CUDA)

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        split = StepSplit.of(meta)
        self._prefills = split.prefills
        self._decode_rows = self._decode_tokens = None
        if split.decode_seqs and split.prefills:  # mixed step: gather the decode sequences
            device = meta.page_table.device
            self._decode_rows = to_device_async(torch.tensor(split.decode_seqs), device)
            self._decode_tokens = to_device_async(torch.tensor(split.decode_rows), device)
        if self.on_cuda and split.decode_seqs:
            from spin_ray.kernels.paged_decode_attention import decode_num_splits

            longest = max(meta.context_lens_cpu[b] for b in split.decode_seqs)
            # from a power-of-two bound, so that graphs of similar steps share a split count
            self._num_splits = decode_num_splits(
                len(split.decode_seqs), self.kv_cache.shape.num_kv_heads,
                bucket(longest), self.meta.page_table.device,
            )  # fmt: skip

    def graph_key(self) -> GraphKey:
        return GraphKey(generation=0, shapes=(self._num_splits,))

    def use_cuda_graphs(self) -> None:
        self.timer.timed = False  # a replay cannot be timed per phase

    def forward(self, layer_idx, q, k, v, scale):
        meta = self.meta
        assert meta is not None, "plan() must be called before forward()"
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        self._store(k_cache, v_cache, k, v, meta.slot_mapping)
        if not self._prefills:
            return self._decode(q, k_cache, v_cache, meta.page_table, meta.context_lens, scale)
        out = torch.empty_like(q)  # [N, Hq, D]
        if self._decode_rows is not None:
            rows, tokens = self._decode_rows, self._decode_tokens
            out[tokens] = self._decode(
                q[tokens], k_cache, v_cache, meta.page_table[rows], meta.context_lens[rows], scale
            )
        for b, start, n, ctx in self._prefills:
            pages = meta.page_table[b, : -(-ctx // meta.page_size)]
            rows = slice(start, start + n)
            out[rows] = self._prefill(
                q[rows], k[rows], v[rows], k_cache, v_cache, pages, ctx, scale
            )
        return out

    def store_prompt_kv(self, request_id, slots, k, v):
        for layer, (layer_k, layer_v) in enumerate(zip(k, v, strict=True)):
            self._store(self.kv_cache.k[layer], self.kv_cache.v[layer], layer_k, layer_v, slots)

    def _store(self, k_cache, v_cache, k, v, slot_mapping):
        if self.on_cuda:
            from spin_ray.kernels.kv_store import store_kv

            store_kv(k_cache, v_cache, k, v, slot_mapping)
        else:
            store_kv_ref(k_cache, v_cache, k, v, slot_mapping)

    def _decode(self, q, k_cache, v_cache, page_table, context_lens, scale):
        with self.timer.phase("attention"):
            return self._decode_kernel(q, k_cache, v_cache, page_table, context_lens, scale)

    def _decode_kernel(self, q, k_cache, v_cache, page_table, context_lens, scale):
        if self.on_cuda:
            from spin_ray.kernels.paged_decode_attention import paged_decode_attention

            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                page_table,
                context_lens,
                scale,
                num_splits=self._num_splits,
            )
        return paged_decode_attention_ref(q, k_cache, v_cache, page_table, context_lens, scale)

    def _prefill(self, q, k, v, k_cache, v_cache, pages, ctx, scale):
        if self.on_cuda:
            from spin_ray.kernels.paged_prefill_attention import paged_prefill_attention

            return paged_prefill_attention(q, k_cache, v_cache, pages, ctx, scale, k, v)
        return paged_prefill_attention_ref(q, k_cache, v_cache, pages, ctx, scale)
