"""The tiered (SPIN) KV cache (an `EngineKVCache`, spin_ray/engine/kv_cache.py): every
request's context in a CPU tier, HBM slots for the working set its sparse attention reads.
`build_tiered_cache` sizes both tiers and builds the algorithm, the cache manager (the
scheduler's capacity object) and the attention backend."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.cache.config import CacheConfig
from spin_ray.cache.kv_cache import KVCache, KVCacheShape
from spin_ray.cache.sizing import gpu_kv_budget_bytes
from spin_ray.cache.stats import KVStats
from spin_ray.engine.kv_layout import KVLayout, PageUsage
from spin_ray.models.arch import ModelArch
from spin_ray.models.rope import rope_inv_freq
from spin_ray.sparse.algorithms import SparseGeometry, build_algorithm
from spin_ray.sparse.backend import SpinAttentionBackend
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.residency import ResidencyTable
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import DeviceTier, HostTier


@dataclass(frozen=True)
class TieredKVCache:
    """A request holds CPU-tier pages for its whole context (the engine's page ids) and HBM
    slots for its working set; a slot holds one page of every tier layer and KV head."""

    page_tables: TieredCacheManager
    """The scheduler's capacity object: CPU-tier pages and HBM slots."""
    backend: SpinAttentionBackend
    capacity_tokens: int
    """Longest sequence both tiers can hold (CPU-tier pages and the HBM working-set floor)."""
    pages_per_slot: int
    """(layer, KV head) pages one HBM slot holds: tier layers × KV heads."""
    pages_per_host_page: int
    """(layer, KV head) pages one CPU-tier page holds: offloaded layers × KV heads."""

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.page_tables.page_size, self.page_tables.budget)

    def presize(self, max_num_seqs: int, max_model_len: int) -> None:
        """Residency tables and slot lists at serving's largest (`TieredCacheManager.presize`)."""
        retrievals = self.backend.retrievals_per_layer
        self.page_tables.presize(max_num_seqs, max_model_len, retrievals)

    def stats(self) -> KVStats:
        """The counters' totals (reads them from the device) and the tiers' gauges, pages in
        (layer, KV head) units."""
        manager, per_slot = self.page_tables, self.pages_per_slot
        per_page = self.pages_per_host_page
        return manager.counters.snapshot(
            gpu_pages_used=manager.slot_pool.num_used * per_slot,
            gpu_pages_buffer=manager.num_buffer_slots * per_slot,
            gpu_pages_total=manager.slot_pool.num_pages * per_slot,
            cpu_pages_used=manager.pool.num_used * per_page,
            cpu_pages_total=manager.pool.num_pages * per_page,
            metadata_bytes=manager.residency.metadata_bytes,
        )

    def usage(self) -> PageUsage:
        slots, pages = self.page_tables.slot_pool, self.page_tables.pool
        return PageUsage(slots.num_used, slots.num_pages, pages.num_used, pages.num_pages)


def build_tiered_cache(
    sparse: SparseConfig,
    cache: CacheConfig,
    arch: ModelArch,
    device: str | torch.device,
    dtype: torch.dtype,
    reserve_bytes: int,
) -> TieredKVCache:
    """`reserve_bytes`: GPU memory to leave for weights not yet loaded and activations."""
    page_size = cache.page_size
    sparse.check_page_size(page_size)
    first = sparse.dense_layers
    if first >= arch.num_layers:
        raise ValueError(
            f"dense_layers: {first} leaves none of the model's {arch.num_layers} layers sparse"
        )
    device = torch.device(device)
    heads, head_dim = arch.num_kv_heads, arch.head_dim
    offloaded = arch.num_layers - first
    itemsize = torch.empty((), dtype=dtype).element_size()
    page_run = 2 * page_size * heads * head_dim * itemsize  # K+V of one page, one layer

    num_cpu_pages = _cpu_pages(sparse, cache, device, offloaded * page_run)
    try:
        host = HostTier(offloaded, num_cpu_pages, heads, page_size, head_dim, dtype, device)
    except RuntimeError as err:  # pinning fails with a CUDA out-of-memory error
        if not _out_of_memory(err):
            raise
        raise ValueError(
            f"cpu_cache_tokens: the CPU tier's {offloaded * num_cpu_pages * page_run / 2**30:.1f}"
            f" GiB of host memory ({num_cpu_pages * page_size} tokens x {offloaded} layers; "
            "pinned on CUDA) could not be allocated; set a smaller cpu_cache_tokens (or "
            "host_memory_fraction)"
        ) from err
    counters = KVCounters(device)
    dense = None
    if first:
        shape = KVCacheShape(first, num_cpu_pages, page_size, heads, head_dim)
        dense = DenseAttentionBackend(KVCache(shape, dtype, device), counters.timer)
    geometry = SparseGeometry(
        num_layers=offloaded,
        first_layer=first,
        num_cpu_pages=num_cpu_pages,
        page_size=page_size,
        num_kv_heads=heads,
        num_q_heads=arch.num_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
        sink_tokens=sparse.sink_tokens,
        rope_inv_freq=rope_inv_freq(head_dim, arch.rope_theta, arch.rope_scaling).to(device),
    )
    algorithm = build_algorithm(geometry, sparse)
    budget = PageBudget.from_config(sparse, page_size, algorithm.index_unit_pages)

    tier_layers = offloaded if sparse.retains else 1
    num_slots = _gpu_slots(
        sparse, cache, device, num_cpu_pages, tier_layers * page_run, reserve_bytes
    )
    gpu = DeviceTier(tier_layers, num_slots, heads, page_size, head_dim, dtype, device)
    residency = ResidencyTable(
        tier_layers, heads, num_slots, sparse.segment_pages, sparse.lru_buckets, device
    )
    manager = TieredCacheManager(num_cpu_pages, num_slots, budget, residency, counters)
    backend = SpinAttentionBackend(
        sparse,
        manager=manager,
        host=host,
        gpu=gpu,
        algorithm=algorithm,
        budget=budget,
        dense=dense,
        first_layer=first,
    )
    capacity = _longest_fitting(budget, num_cpu_pages * page_size, num_slots)
    if capacity < 2:
        raise ValueError(
            f"gpu_cache_tokens: {num_slots * page_size} tokens of HBM slots cannot hold the "
            "working set of even a short request; raise it"
        )
    return TieredKVCache(manager, backend, capacity, tier_layers * heads, offloaded * heads)


def _out_of_memory(err: RuntimeError) -> bool:
    """A failed allocation: reads like a GPU problem when pinning host memory fails."""
    message = str(err).lower()
    return "out of memory" in message or "can't allocate memory" in message


def _cpu_pages(
    sparse: SparseConfig, cache: CacheConfig, device: torch.device, page_bytes: int
) -> int:
    if sparse.cpu_cache_tokens is not None:
        return max(1, sparse.cpu_cache_tokens // cache.page_size)
    if cache.num_pages is not None:
        return cache.num_pages
    if device.type != "cuda":
        return cache.cpu_kv_tokens // cache.page_size
    available = _available_host_bytes()
    pages = int(available * sparse.host_memory_fraction) // page_bytes
    if pages < 1:
        raise ValueError(
            "cpu_cache_tokens: no host memory left for the CPU tier "
            f"({available / 2**30:.1f} GiB available); set it explicitly"
        )
    return pages


def _gpu_slots(
    sparse: SparseConfig,
    cache: CacheConfig,
    device: torch.device,
    num_cpu_pages: int,
    slot_bytes: int,
    reserve: int,
) -> int:
    if sparse.gpu_cache_tokens is not None:
        return max(1, sparse.gpu_cache_tokens // cache.page_size)
    if device.type != "cuda":
        return num_cpu_pages
    budget = gpu_kv_budget_bytes(device, cache.gpu_memory_utilization, reserve)
    slots = budget // slot_bytes
    if slots < 1:
        raise ValueError(
            "gpu_memory_utilization: no GPU memory left for HBM slots after the weights, the "
            "dense layers' KV and the summaries; raise it or set a smaller cpu_cache_tokens"
        )
    return slots


def _available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _longest_fitting(budget: PageBudget, cpu_tokens: int, num_slots: int) -> int:
    """Largest context whose HBM floor fits the slots (the floor grows with the context)."""
    lo, hi = 0, cpu_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.floor_pages(mid) <= num_slots:
            lo = mid
        else:
            hi = mid - 1
    return lo
