"""Cache statistics: a frozen snapshot (`KVStats`, what `LLM.kv_stats()` returns and the
metrics read, spin_ray.metrics) and the running counters behind it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spin_ray.attention.phase_timer import PhaseTimer


@dataclass(frozen=True)
class KVStats:
    """Cumulative since the engine started, except the `*_used` gauges. Pages are counted per
    (layer, KV head): one page is `page_size` tokens of K and V of one head of one layer."""

    lookups: int = 0
    """Selected pages looked up in the HBM buffer (decode steps, offloaded layers)."""
    hits: int = 0
    """Lookups found resident in HBM (no PCIe transfer)."""
    h2d_bytes: int = 0
    """Bytes moved host → GPU (page fetches and prefill prefix reads)."""
    prefetched_bytes: int = 0
    """Of `h2d_bytes`, the pages fetched one layer early for a predicted selection
    (`SparseConfig.lookahead`)."""
    d2h_bytes: int = 0
    """Bytes moved GPU → host (new KV offloaded to the CPU tier)."""
    evictions: int = 0
    """Pages dropped from HBM to make room (bucketed LRU, buffer shrinking)."""
    gpu_pages_used: int = 0
    """HBM page slots held by requests now (their working sets, buffers and prefill slots)."""
    gpu_pages_buffer: int = 0
    """Of `gpu_pages_used`, the slots kept for reuse beyond what each request's next decode
    step attends (the HBM buffer); 0 for the dense engine."""
    gpu_pages_total: int = 0
    cpu_pages_used: int = 0
    """Pages held in the CPU tier now."""
    cpu_pages_total: int = 0
    metadata_bytes: int = 0
    """Bytes of the residency page tables (two-level)."""
    select_time_s: float | None = 0.0
    """Time scoring and choosing pages (this and the other times: None when decode steps ran
    in CUDA graphs, which cannot be timed per phase)."""
    fetch_time_s: float | None = 0.0
    """Time looking up, evicting and fetching pages."""
    index_time_s: float | None = 0.0
    """Time building partition summaries."""
    attention_time_s: float | None = 0.0
    """Time in decode attention, every layer's (prefill attention is in no phase)."""

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class KVCounters:
    """Running totals. Counts computed on the device stay there until `snapshot` reads them,
    and phases are timed with CUDA events on the GPU, so counting adds no synchronisation."""

    def __init__(self, device: torch.device):
        self.device = device
        # lookups, hits, evictions, h2d bytes of page fetches
        self._counts = torch.zeros(4, dtype=torch.int64, device=device)
        self._prefetch_counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.h2d_bytes = 0  # host-counted transfers (prefix reads, indexing)
        self.d2h_bytes = 0
        self.timer = PhaseTimer(device, ("select", "fetch", "index", "attention"))
        """Phase times; the backend's dense layers share it (their decode attention counts)."""

    def add_lookups(self, lookups: torch.Tensor | int, hits: torch.Tensor | int) -> None:
        self._counts[0] += lookups
        self._counts[1] += hits

    def add_evictions(self, evictions: torch.Tensor | int) -> None:
        self._counts[2] += evictions

    @property
    def device_counts(self) -> torch.Tensor:  # [4] int64
        """The device-side totals (lookups, hits, evictions, fetched bytes), for kernels that
        add to them in place."""
        return self._counts

    @property
    def prefetch_counts(self) -> torch.Tensor:  # [4] int64
        """`device_counts` of lookahead retrievals: their evictions and bytes count in the
        totals, their lookups and hits do not (the hit rate is the real selections')."""
        return self._prefetch_counts

    def add_fetched_bytes(self, num_bytes: torch.Tensor) -> None:
        """Bytes of page fetches counted on the device (`h2d_bytes` adds them up)."""
        self._counts[3] += num_bytes

    def snapshot(self, **gauges: int) -> KVStats:
        lookups, hits, evictions, fetched = self._counts.tolist()
        _, _, prefetch_evictions, prefetched = self._prefetch_counts.tolist()
        seconds = self.timer.seconds()
        return KVStats(
            lookups=lookups,
            hits=hits,
            h2d_bytes=self.h2d_bytes + fetched + prefetched,
            prefetched_bytes=prefetched,
            d2h_bytes=self.d2h_bytes,
            evictions=evictions + prefetch_evictions,
            select_time_s=seconds["select"],
            fetch_time_s=seconds["fetch"],
            index_time_s=seconds["index"],
            attention_time_s=seconds["attention"],
            **gauges,
        )
