"""`EngineMetrics`: the engine's `StatLogger` that turns each `EngineStats` into the metrics of
`definitions` on one sink (Prometheus or Ray). Cache counters arrive as cumulative snapshots
(`KVStats`); the counters get what grew since the last one."""

from __future__ import annotations

from spin_ray.cache.stats import KVStats
from spin_ray.engine.config import EngineConfig
from spin_ray.engine.stats import EngineStats
from spin_ray.metrics import definitions as m
from spin_ray.metrics.sink import MetricSink

_PHASES = ("select", "fetch", "index", "attention")
_FINISH_REASONS = ("stop", "length", "abort")


def engine_labels(config: EngineConfig, model: str | None = None) -> dict[str, str]:
    """The `ENGINE_LABELS` of an engine: `model` (default: the config's model), its sparse
    algorithm and tier policy ("dense" for both without a sparse cache)."""
    sparse = config.sparse
    return {
        "model": model or config.model,
        "algorithm": "dense" if sparse is None else sparse.algorithm.name,
        "tiers": "dense" if sparse is None else str(sparse.tiers),
    }


class EngineMetrics:
    """Counters start at zero when it is made (every series exists before its first event, so
    rates and ratios have data from the start); cache counters count from `baseline`, the
    engine's snapshot then (a warm-up before it is not counted)."""

    def __init__(self, sink: MetricSink, labels: dict[str, str], baseline: KVStats):
        self.sink = sink
        self.labels = labels
        self.last_kv = baseline
        """The last cache snapshot exported."""
        for spec in (m.PREEMPTIONS, m.PROMPT_TOKENS, m.GENERATION_TOKENS):
            sink.inc(spec, 0, labels)
        for reason in _FINISH_REASONS:
            sink.inc(m.REQUESTS_FINISHED, 0, {**labels, "finish_reason": reason})
        self._record_kv(baseline)

    def record(self, stats: EngineStats) -> None:
        sink, labels = self.sink, self.labels
        sink.set(m.REQUESTS_RUNNING, stats.num_running, labels)
        sink.set(m.REQUESTS_WAITING, stats.num_waiting, labels)
        sink.inc(m.PREEMPTIONS, stats.num_preemptions, labels)
        sink.inc(m.PROMPT_TOKENS, stats.prompt_tokens, labels)
        sink.inc(m.GENERATION_TOKENS, stats.generation_tokens, labels)
        if stats.step_kind is not None:
            sink.observe(m.STEP_SECONDS, stats.step_seconds, {**labels, "kind": stats.step_kind})
        for seconds in stats.time_to_first_token_s:
            sink.observe(m.TIME_TO_FIRST_TOKEN, seconds, labels)
        for seconds in stats.inter_token_latency_s:
            sink.observe(m.INTER_TOKEN_LATENCY, seconds, labels)
        for done in stats.finished:
            sink.inc(m.REQUESTS_FINISHED, 1, {**labels, "finish_reason": done.finish_reason})
            sink.observe(m.E2E_LATENCY, done.e2e_latency_s, labels)
            if done.time_per_output_token_s is not None:
                sink.observe(m.TIME_PER_OUTPUT_TOKEN, done.time_per_output_token_s, labels)
        if stats.kv is not None:
            self._record_kv(stats.kv)

    def _record_kv(self, kv: KVStats) -> None:
        sink, labels, last = self.sink, self.labels, self.last_kv
        sink.inc(m.KV_LOOKUPS, kv.lookups - last.lookups, labels)
        sink.inc(m.KV_HITS, kv.hits - last.hits, labels)
        sink.inc(m.PCIE_BYTES, kv.h2d_bytes - last.h2d_bytes, {**labels, "direction": "h2d"})
        sink.inc(m.PCIE_BYTES, kv.d2h_bytes - last.d2h_bytes, {**labels, "direction": "d2h"})
        sink.inc(m.PREFETCHED_BYTES, kv.prefetched_bytes - last.prefetched_bytes, labels)
        sink.inc(m.EVICTIONS, kv.evictions - last.evictions, labels)
        for phase in _PHASES:
            now, before = getattr(kv, f"{phase}_time_s"), getattr(last, f"{phase}_time_s")
            if now is not None:  # None: decode steps ran in CUDA graphs, untimed
                sink.inc(m.PHASE_SECONDS, now - (before or 0.0), {**labels, "phase": phase})
        hbm_used = kv.gpu_pages_used - kv.gpu_pages_buffer
        pages = {
            ("hbm", "used"): hbm_used,
            ("hbm", "buffer"): kv.gpu_pages_buffer,
            ("hbm", "free"): kv.gpu_pages_total - kv.gpu_pages_used,
            ("host", "used"): kv.cpu_pages_used,
            ("host", "free"): kv.cpu_pages_total - kv.cpu_pages_used,
        }
        for (tier, state), count in pages.items():
            sink.set(m.KV_PAGES, count, {**labels, "tier": tier, "state": state})
        sink.set(m.KV_METADATA_BYTES, kv.metadata_bytes, labels)
        self.last_kv = kv
