"""The panels of spin-ray's Grafana dashboard, as data: title, PromQL queries (with their
legends), unit. `spin_ray.dashboards.build` lays them out with grafana-foundation-sdk; the
Prometheus test evaluates every query here against a real Prometheus.

The queries read the names Ray Serve exports (`ray_` + each name of
`spin_ray.metrics.definitions`), filtered by the `$replica` variable (engine replicas).
"""

from __future__ import annotations

from dataclasses import dataclass

from spin_ray.metrics import definitions as m

ENGINE = 'replica=~"$replica"'
"""Selects the engine replicas of the `$replica` variable."""
WINDOW = "$__rate_interval"
ERRORS = 'status=~"[45].."'
"""Selects HTTP responses with a 4xx or 5xx status."""


def ray(spec: m.MetricSpec, suffix: str = "") -> str:
    """The name Ray Serve exports for `spec` (`suffix`: e.g. "_bucket" of a histogram)."""
    return f"ray_{spec.name}{suffix}"


def rate(spec: m.MetricSpec, selector: str = ENGINE, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({ray(spec)}{{{selector}}}[{WINDOW}]))"


def quantile(q: float, spec: m.MetricSpec) -> str:
    buckets = f"rate({ray(spec, '_bucket')}{{{ENGINE}}}[{WINDOW}])"
    return f"histogram_quantile({q}, sum by (le) ({buckets}))"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str
    """A Grafana unit id: percentunit, Bps, s, short, reqps, ..."""
    kind: str = "timeseries"
    """"timeseries" or "stat"."""


def _latency(title: str, description: str, spec: m.MetricSpec) -> PanelSpec:
    return PanelSpec(
        title,
        description,
        (Query(quantile(0.5, spec), "p50"), Query(quantile(0.99, spec), "p99")),
        "s",
    )


HIT_RATIO_BY_REPLICA = f"{rate(m.KV_HITS, by='replica')} / {rate(m.KV_LOOKUPS, by='replica')}"
HIT_RATIO = f"{rate(m.KV_HITS)} / {rate(m.KV_LOOKUPS)}"
ERROR_RATE = f"{rate(m.HTTP_RESPONSES, ERRORS)} / {rate(m.HTTP_RESPONSES, '')}"

CACHE_PANELS = (
    PanelSpec(
        "HBM hit rate",
        "Share of the selected KV pages found in the HBM buffer (no PCIe transfer): "
        "rate(hits) / rate(lookups). SPIN reports ~90% and more for trained models.",
        (Query(HIT_RATIO, "all replicas"),),
        "percentunit",
        kind="stat",
    ),
    PanelSpec(
        "HBM hit rate per replica",
        "rate(hits) / rate(lookups) of each engine replica.",
        (Query(HIT_RATIO_BY_REPLICA, "{{replica}}"),),
        "percentunit",
    ),
    PanelSpec(
        "PCIe traffic",
        "KV bytes per second over PCIe: h2d (page fetches, prefix reads), d2h (offload).",
        (Query(rate(m.PCIE_BYTES, by="direction"), "{{direction}}"),),
        "Bps",
    ),
    PanelSpec(
        "KV pages by tier and state",
        "HBM: used (next steps' pages, prefill slots), buffer (kept for reuse), free; host: "
        "used, free. One page: page_size tokens of one layer and KV head.",
        (Query(f"sum by (tier, state) ({ray(m.KV_PAGES)}{{{ENGINE}}})", "{{tier}} {{state}}"),),
        "short",
    ),
    PanelSpec(
        "Evictions",
        "KV pages dropped from HBM per second (bucketed LRU, buffers shrinking).",
        (Query(rate(m.EVICTIONS), "evictions"),),
        "short",
    ),
    PanelSpec(
        "Sparse decode phases",
        "Seconds per second in each phase of sparse decode (eager steps only: CUDA-graph "
        "replays are not timed).",
        (Query(rate(m.PHASE_SECONDS, by="phase"), "{{phase}}"),),
        "s",
    ),
)

ENGINE_PANELS = (
    PanelSpec(
        "Tokens per second",
        "Generated tokens and prompt tokens run through the model, per second.",
        (
            Query(rate(m.GENERATION_TOKENS), "generation"),
            Query(rate(m.PROMPT_TOKENS), "prompt"),
        ),
        "short",
    ),
    PanelSpec(
        "Requests running and waiting",
        "Requests scheduled in the engines, and queued for admission.",
        (
            Query(f"sum({ray(m.REQUESTS_RUNNING)}{{{ENGINE}}})", "running"),
            Query(f"sum({ray(m.REQUESTS_WAITING)}{{{ENGINE}}})", "waiting"),
        ),
        "short",
    ),
    PanelSpec(
        "Preemptions",
        "Requests preempted per second for want of KV pages (recomputed later).",
        (Query(rate(m.PREEMPTIONS), "preemptions"),),
        "short",
    ),
    _latency(
        "Time to first token", "Arrival in the engine to first token.", m.TIME_TO_FIRST_TOKEN
    ),  # fmt: skip
    _latency(
        "Time per output token",
        "Per request: first token to last over the tokens after the first.",
        m.TIME_PER_OUTPUT_TOKEN,
    ),  # fmt: skip
    _latency(
        "Inter-token latency",
        "Time between consecutive tokens of a request.",
        m.INTER_TOKEN_LATENCY,
    ),  # fmt: skip
    PanelSpec(
        "Step time",
        "Engine step wall time by kind: decode only, or mixed (with a prompt chunk).",
        (
            Query(
                f"histogram_quantile(0.5, sum by (le, kind) (rate("
                f"{ray(m.STEP_SECONDS, '_bucket')}{{{ENGINE}}}[{WINDOW}])))",
                "{{kind}} p50",
            ),
        ),
        "s",
    ),
)

SERVING_PANELS = (
    PanelSpec(
        "Router placements per replica",
        "Requests per second the KV working-set router sent to each engine replica, ranked by "
        "its working set or by fallback (no fresh replica stats).",
        (
            Query(
                rate(
                    m.ROUTER_PLACEMENTS, 'engine_replica=~"$replica"', "engine_replica, placement"
                ),
                "{{engine_replica}} {{placement}}",
            ),
        ),
        "reqps",
    ),
    PanelSpec(
        "HTTP error rate",
        "Share of the OpenAI API's responses with status 4xx or 5xx.",
        (Query(ERROR_RATE, "errors"),),
        "percentunit",
    ),
    PanelSpec(
        "HTTP responses by status",
        "Responses per second of the OpenAI API, by status code.",
        (Query(rate(m.HTTP_RESPONSES, "", "status"), "{{status}}"),),
        "reqps",
    ),
)

ROWS = (
    ("SPIN KV cache", CACHE_PANELS),
    ("Engine", ENGINE_PANELS),
    ("Serving", SERVING_PANELS),
)
"""The dashboard's rows, top to bottom."""
