"""The KV cache an engine runs on: one contract (`EngineKVCache`), two implementations, and
`build_kv_cache`, the one place that knows which is which.

- `DenseKVCache` (engine/dense_kv_cache.py): every layer's KV in one pool of HBM pages, dense
  paged attention over it.
- `TieredKVCache` (engine/tiered_kv_cache.py): every request's context in a CPU tier, HBM slots
  for the working set its sparse attention reads (SPIN).

Everything outside the factory talks to the contract: the scheduler to `page_tables`, the model
to `backend`, the engine to `capacity_tokens`, `presize` and `stats`, the serve replica to
`layout` and `usage`. Nothing asks which implementation it holds.
"""

from __future__ import annotations

from typing import Protocol

from spin_ray.attention.backend import AttentionBackend
from spin_ray.cache.page_pool import PagePool
from spin_ray.cache.stats import KVStats
from spin_ray.engine.config import EngineConfig
from spin_ray.engine.dense_kv_cache import build_dense_cache
from spin_ray.engine.kv_layout import KVLayout, PageUsage
from spin_ray.engine.scheduler import KVCapacity
from spin_ray.engine.tiered_kv_cache import build_tiered_cache
from spin_ray.models.arch import ModelArch


class KVPageTables(KVCapacity, Protocol):
    """The cache's page-id lists: the scheduler grows and releases them (`KVCapacity`), a
    step's page tables are read from them. Page ids index the pool that holds every request's
    whole context (HBM pages, or the tiered cache's CPU-tier pages)."""

    page_size: int
    """Tokens per page."""
    pool: PagePool
    """The pool the page ids come from."""
    tables: dict[str, list[int]]
    """Request id → its page ids in sequence order; a list only grows while its request runs."""

    def table(self, request_id: str) -> list[int]:
        """The request's page ids ([] if it holds none)."""
        ...

    def check_integrity(self) -> None:
        """Raise `CacheIntegrityError` if a page is leaked or owned twice."""
        ...


class EngineKVCache(Protocol):
    """A KV cache as the engine, the router and the metrics see it."""

    page_tables: KVPageTables
    """What the scheduler allocates from and the engine's steps read page ids from."""
    backend: AttentionBackend
    """Stores each layer's K/V into this cache and attends over it (the model's backend)."""
    capacity_tokens: int
    """The longest sequence the cache can hold (bounds `max_model_len`)."""

    @property
    def layout(self) -> KVLayout:
        """How the cache keeps KV, for the router's working-set predictions."""
        ...

    def presize(self, max_num_seqs: int, max_model_len: int) -> None:
        """Allocate once, before serving, what serving would otherwise grow (and so reallocate
        under CUDA graphs): called with the engine's resolved limits."""
        ...

    def stats(self) -> KVStats:
        """A snapshot of the cache's statistics (cumulative counters, gauges of now); may wait
        for the device."""
        ...

    def usage(self) -> PageUsage:
        """Pages of each tier in use now, in the router's units; never waits for the device."""
        ...


def build_kv_cache(config: EngineConfig, arch: ModelArch, reserve_bytes: int) -> EngineKVCache:
    """The engine's cache: tiered with a sparse config, else dense. `reserve_bytes`: GPU
    memory to leave for weights not yet loaded and activations."""
    device, dtype = config.device, config.dtype
    if config.sparse is not None:
        return build_tiered_cache(config.sparse, config.cache, arch, device, dtype, reserve_bytes)
    return build_dense_cache(config.cache, arch, device, dtype, reserve_bytes)
