"""Every metric spin-ray exports, named once: its Prometheus name, type, help and labels.

Prometheus conventions: snake_case, base units in the name (`_seconds`, `_bytes`), counters end
in `_total`, no colons. Labels never carry a request id or text (each label value multiplies the
series Prometheus keeps). The sinks (`prometheus_sink`, `ray_sink`) build their metrics from
these specs; inside Ray Serve, Ray prefixes every name with `ray_` and adds its deployment,
replica and application labels. docs/observability.md explains each metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]

ENGINE_LABELS = ("model", "algorithm", "tiers")
"""Labels of every engine metric: the model, the sparse algorithm ("dense" without one, "full"
in the dense-offload baseline) and the tier policy ("spin", "sparse-naive", or "dense")."""

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                     20.48, 40.96, 81.92, 163.84)  # fmt: skip
"""Histogram buckets of request latencies (TTFT, end to end), doubling from 5 ms."""

TOKEN_LATENCY_BUCKETS_S = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                           0.512, 1.024, 2.048)  # fmt: skip
"""Buckets of per-token and per-step times (ITL, TPOT, step time), doubling from 1 ms."""

_NAME = re.compile(r"^spin_ray_[a-z0-9_]+$")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """The exported name (before Ray's `ray_` prefix)."""
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ENGINE_LABELS
    buckets: tuple[float, ...] = ()
    """Upper bounds of a histogram's buckets (without +Inf)."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name: {self.name!r} is not spin_ray_ + snake_case")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"name: {self.name!r}: counters, and only they, end in _total")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"buckets: {self.name!r}: histograms, and only they, have buckets")


# KV cache (two-tier SPIN cache; the dense engine reports its HBM pages only)
KV_LOOKUPS = MetricSpec(
    "spin_ray_kv_lookups_total",
    "counter",
    "Selected KV pages looked up in the HBM buffer (decode steps of offloaded layers).",
)
KV_HITS = MetricSpec(
    "spin_ray_kv_hits_total",
    "counter",
    "Lookups found resident in HBM, needing no PCIe transfer. Hit ratio: "
    "rate(hits) / rate(lookups).",
)
PCIE_BYTES = MetricSpec(
    "spin_ray_pcie_bytes_total",
    "counter",
    "KV bytes moved over PCIe: h2d (page fetches, prefix reads) and d2h (offload to host).",
    (*ENGINE_LABELS, "direction"),
)
PREFETCHED_BYTES = MetricSpec(
    "spin_ray_kv_prefetched_bytes_total",
    "counter",
    "Of the h2d bytes, pages fetched one layer early for a predicted selection (lookahead).",
)
EVICTIONS = MetricSpec(
    "spin_ray_kv_evictions_total",
    "counter",
    "KV pages dropped from HBM to make room (bucketed LRU, buffer shrinking).",
)
KV_PAGES = MetricSpec(
    "spin_ray_kv_pages",
    "gauge",
    "KV pages (one page: page_size tokens of one layer and KV head) by tier (hbm, host) and "
    "state: used (what requests' next steps attend, prefill slots; all held pages on host), "
    "buffer (HBM kept for reuse), free.",
    (*ENGINE_LABELS, "tier", "state"),
)
KV_METADATA_BYTES = MetricSpec(
    "spin_ray_kv_metadata_bytes",
    "gauge",
    "Bytes of the two-level residency page tables.",
)
PHASE_SECONDS = MetricSpec(
    "spin_ray_phase_seconds_total",
    "counter",
    "Time in each phase of sparse decode (select, fetch, index, attention); only eager steps "
    "are timed (CUDA-graph replays are not).",
    (*ENGINE_LABELS, "phase"),
)

# Scheduler and requests
REQUESTS_RUNNING = MetricSpec(
    "spin_ray_requests_running", "gauge", "Requests scheduled in the engine now."
)
REQUESTS_WAITING = MetricSpec(
    "spin_ray_requests_waiting", "gauge", "Requests queued in the engine, not yet admitted."
)
PREEMPTIONS = MetricSpec(
    "spin_ray_preemptions_total",
    "counter",
    "Requests preempted for want of KV pages (their KV is computed again later).",
)
REQUESTS_FINISHED = MetricSpec(
    "spin_ray_requests_finished_total",
    "counter",
    "Requests ended, by finish_reason: stop, length or abort.",
    (*ENGINE_LABELS, "finish_reason"),
)
PROMPT_TOKENS = MetricSpec(
    "spin_ray_prompt_tokens_total",
    "counter",
    "Prompt tokens run through the model (prefill chunks; recomputed ones included).",
)
GENERATION_TOKENS = MetricSpec("spin_ray_generation_tokens_total", "counter", "Tokens generated.")

# Latencies
STEP_SECONDS = MetricSpec(
    "spin_ray_step_seconds",
    "histogram",
    "Wall time of one engine step, by kind: decode (decode rows only) or mixed (with a "
    "prompt chunk).",
    (*ENGINE_LABELS, "kind"),
    TOKEN_LATENCY_BUCKETS_S,
)
TIME_TO_FIRST_TOKEN = MetricSpec(
    "spin_ray_time_to_first_token_seconds",
    "histogram",
    "Arrival in the engine to first token (TTFT).",
    buckets=LATENCY_BUCKETS_S,
)
INTER_TOKEN_LATENCY = MetricSpec(
    "spin_ray_inter_token_latency_seconds",
    "histogram",
    "Time between a request's consecutive tokens (ITL).",
    buckets=TOKEN_LATENCY_BUCKETS_S,
)
TIME_PER_OUTPUT_TOKEN = MetricSpec(
    "spin_ray_time_per_output_token_seconds",
    "histogram",
    "Per finished request: first token to last over the tokens after the first (TPOT).",
    buckets=TOKEN_LATENCY_BUCKETS_S,
)
E2E_LATENCY = MetricSpec(
    "spin_ray_e2e_request_latency_seconds",
    "histogram",
    "Per finished request: arrival in the engine to its end.",
    buckets=LATENCY_BUCKETS_S,
)

# Serving (Ray Serve ingress and router)
ROUTER_PLACEMENTS = MetricSpec(
    "spin_ray_router_placements_total",
    "counter",
    "Requests the KV working-set router placed on each engine replica (engine_replica: Ray "
    "Serve's replica id), by how: working_set (ranked by its fresh stats) or fallback (no "
    "fresh stats: shortest queue).",
    ("engine_replica", "placement"),
)
HTTP_RESPONSES = MetricSpec(
    "spin_ray_http_responses_total",
    "counter",
    "HTTP responses of the OpenAI API by status code and route (error rate: status >= 400).",
    ("model", "route", "status"),
)

ENGINE_METRICS = (
    KV_LOOKUPS, KV_HITS, PCIE_BYTES, PREFETCHED_BYTES, EVICTIONS, KV_PAGES, KV_METADATA_BYTES,
    PHASE_SECONDS, REQUESTS_RUNNING, REQUESTS_WAITING, PREEMPTIONS, REQUESTS_FINISHED,
    PROMPT_TOKENS, GENERATION_TOKENS, STEP_SECONDS, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY,
    TIME_PER_OUTPUT_TOKEN, E2E_LATENCY,
)  # fmt: skip
SERVING_METRICS = (ROUTER_PLACEMENTS, HTTP_RESPONSES)
ALL_METRICS = ENGINE_METRICS + SERVING_METRICS
