"""Cache statistics: the frozen snapshot every KV cache gives (`KVStats`: what
`LLM.kv_stats()` returns and the metrics read, spin_ray.metrics)."""

from __future__ import annotations

from dataclasses import dataclass


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
