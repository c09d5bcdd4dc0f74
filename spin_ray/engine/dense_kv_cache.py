"""The dense paged KV cache (an `EngineKVCache`): every layer's KV in one pool of pages on the
device, dense paged attention over each request's whole context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.cache.config import CacheConfig
from spin_ray.cache.kv_cache import KVCache, KVCacheShape
from spin_ray.cache.page_pool import PagePool
from spin_ray.cache.page_table import PageTables
from spin_ray.cache.sizing import num_kv_pages
from spin_ray.cache.stats import KVStats
from spin_ray.engine.kv_layout import KVLayout, PageUsage
from spin_ray.models.arch import ModelArch


@dataclass(frozen=True)
class DenseKVCache:
    """A page holds `page_size` tokens of K and V of every layer and KV head; a request holds
    pages for its whole context."""

    page_tables: PageTables
    backend: DenseAttentionBackend
    capacity_tokens: int
    """Every page of the pool: one request may fill it."""

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.page_tables.page_size)

    def presize(self, max_num_seqs: int, max_model_len: int) -> None:
        """Nothing to do: the pool and its storage are allocated whole when built."""

    def stats(self) -> KVStats:
        """Pages in (layer, KV head) units and decode attention time; dense selects, fetches
        and indexes nothing."""
        shape = self.backend.kv_cache.shape
        per_page = shape.num_layers * shape.num_kv_heads  # pages hold every layer
        pool = self.page_tables.pool
        return KVStats(
            gpu_pages_used=pool.num_used * per_page,
            gpu_pages_total=pool.num_pages * per_page,
            attention_time_s=self.backend.timer.seconds()["attention"],
        )

    def usage(self) -> PageUsage:
        pool = self.page_tables.pool
        return PageUsage(hbm_pages_used=pool.num_used, hbm_pages_total=pool.num_pages)


def build_dense_cache(
    config: CacheConfig, arch: ModelArch, device: str, dtype: torch.dtype, reserve_bytes: int
) -> DenseKVCache:
    """As many pages as `config` sizes (on CUDA: the memory left after `reserve_bytes`, for
    weights not yet loaded and activations), allocated now."""
    page_size, heads, head_dim = config.page_size, arch.num_kv_heads, arch.head_dim
    per_token = KVCacheShape(arch.num_layers, 0, page_size, heads, head_dim).bytes_per_token(dtype)
    num_pages = num_kv_pages(config, device, per_token, reserve_bytes)
    shape = KVCacheShape(arch.num_layers, num_pages, page_size, heads, head_dim)
    backend = DenseAttentionBackend(KVCache(shape, dtype, device))
    return DenseKVCache(PageTables(PagePool(num_pages), page_size), backend, num_pages * page_size)
