"""Engine metrics through the prometheus-client sink (no Ray): every exported figure equals the
engine's own account (`kv_stats()`, the outputs), names follow Prometheus conventions, and
`LLM(metrics_port=...)` serves them over HTTP."""

from __future__ import annotations

import socket
import urllib.request

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from spin_ray import SamplingParams
from spin_ray.metrics import EngineMetrics, engine_labels
from spin_ray.metrics import definitions as m
from spin_ray.metrics.prometheus_sink import PrometheusSink

SPARSE = dict(
    sparse="quest",
    token_budget=64,
    sink_tokens=16,
    local_tokens=16,
    dense_layers=1,
    buffer_ratio=4.0,
    min_buffer_ratio=1.0,
    gpu_cache_tokens=2048,
    cpu_cache_tokens=16384,
)
PROMPT_LEN, MAX_TOKENS, NUM_PROMPTS = 400, 12, 3


def _value(registry: CollectorRegistry, name: str, **labels) -> float:
    """The sample `name` with `labels` (among others); 0 if there is none."""
    value = registry.get_sample_value(name, {"model": "spin-tiny", **labels})
    return 0.0 if value is None else value


def _prompts(n: int) -> list[dict]:
    return [
        {"prompt_token_ids": [(7 * i + j) % 250 + 1 for i in range(PROMPT_LEN)]} for j in range(n)
    ]


@pytest.fixture
def metered(make_llm):
    """A sparse spin engine with its metrics in a private registry."""
    llm = make_llm(**SPARSE)
    registry = CollectorRegistry()
    labels = engine_labels(llm.llm_engine.config)
    metrics = EngineMetrics(PrometheusSink(registry), labels, llm.llm_engine.kv_stats())
    llm.llm_engine.stat_loggers.append(metrics)
    return llm, registry


def test_labels_name_model_algorithm_and_tiers(metered, make_llm):
    llm, _ = metered
    assert engine_labels(llm.llm_engine.config) == {
        "model": "spin-tiny",
        "algorithm": "quest",
        "tiers": "spin",
    }
    dense = make_llm()
    assert engine_labels(dense.llm_engine.config, "served") == {
        "model": "served",
        "algorithm": "dense",
        "tiers": "dense",
    }


def test_every_figure_matches_the_engines_own_account(metered):
    llm, registry = metered
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(_prompts(NUM_PROMPTS), params)
    kv = llm.kv_stats()  # the engine is idle: its last call exported this snapshot
    engine = {"algorithm": "quest", "tiers": "spin"}

    assert kv.lookups > 0 and 0 < kv.hits < kv.lookups and kv.h2d_bytes > 0
    assert _value(registry, "spin_ray_kv_lookups_total", **engine) == kv.lookups
    assert _value(registry, "spin_ray_kv_hits_total", **engine) == kv.hits
    for direction, expected in (("h2d", kv.h2d_bytes), ("d2h", kv.d2h_bytes)):
        got = _value(registry, "spin_ray_pcie_bytes_total", direction=direction, **engine)
        assert got == expected
    assert _value(registry, "spin_ray_kv_evictions_total", **engine) == kv.evictions
    for phase in ("select", "fetch", "attention"):  # eager on the CPU: every phase is timed
        got = _value(registry, "spin_ray_phase_seconds_total", phase=phase, **engine)
        assert got == pytest.approx(getattr(kv, f"{phase}_time_s"))
    pages = {
        (tier, state): _value(registry, "spin_ray_kv_pages", tier=tier, state=state, **engine)
        for tier, state in [("hbm", "used"), ("hbm", "buffer"), ("hbm", "free"),
                            ("host", "used"), ("host", "free")]
    }  # fmt: skip
    assert pages[("hbm", "free")] == kv.gpu_pages_total and pages[("host", "used")] == 0
    assert pages[("host", "free")] == kv.cpu_pages_total

    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert generated == NUM_PROMPTS * MAX_TOKENS
    assert _value(registry, "spin_ray_generation_tokens_total", **engine) == generated
    assert _value(registry, "spin_ray_prompt_tokens_total", **engine) == NUM_PROMPTS * PROMPT_LEN
    finished = _value(
        registry, "spin_ray_requests_finished_total", finish_reason="length", **engine
    )
    assert finished == NUM_PROMPTS
    assert _value(registry, "spin_ray_requests_running", **engine) == 0
    assert _value(registry, "spin_ray_requests_waiting", **engine) == 0
    # one TTFT and one e2e latency per request, an ITL per later token
    ttft = _value(registry, "spin_ray_time_to_first_token_seconds_count", **engine)
    assert ttft == NUM_PROMPTS
    assert _value(registry, "spin_ray_time_to_first_token_seconds_sum", **engine) == pytest.approx(
        sum(o.metrics.ttft for o in outputs)
    )
    itl = _value(registry, "spin_ray_inter_token_latency_seconds_count", **engine)
    assert itl == NUM_PROMPTS * (MAX_TOKENS - 1)
    assert _value(registry, "spin_ray_e2e_request_latency_seconds_count", **engine) == NUM_PROMPTS
    tpot = _value(registry, "spin_ray_time_per_output_token_seconds_count", **engine)
    assert tpot == NUM_PROMPTS
    # the steps that read tokens: one per generated token of the batch, the first of them
    # with the prompt chunks (mixed), the others decode only
    decode = _value(registry, "spin_ray_step_seconds_count", kind="decode", **engine)
    mixed = _value(registry, "spin_ray_step_seconds_count", kind="mixed", **engine)
    assert mixed >= 1 and decode >= MAX_TOKENS - 1


def test_an_abort_counts_as_finished_by_abort(metered):
    llm, registry = metered
    engine = llm.llm_engine
    engine.add_request("a", _prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    labels = {"algorithm": "quest", "tiers": "spin"}
    assert (
        _value(registry, "spin_ray_requests_finished_total", finish_reason="abort", **labels) == 1
    )
    assert _value(registry, "spin_ray_kv_pages", tier="host", state="used", **labels) == 0


def test_metric_specs_follow_prometheus_conventions():
    names = [spec.name for spec in m.ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in m.ALL_METRICS:
        assert spec.name == spec.name.lower() and ":" not in spec.name
        assert not {"request_id", "prompt", "text"} & set(spec.labels)
        if spec.kind == "counter":
            assert spec.name.endswith("_total")
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and list(spec.buckets) == sorted(spec.buckets)
    with pytest.raises(ValueError, match="_total"):
        m.MetricSpec("spin_ray_things", "counter", "not a counter name")
    with pytest.raises(ValueError, match="snake_case"):
        m.MetricSpec("spin_ray:bad_total", "counter", "a colon")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llm_metrics_port_serves_the_metrics_over_http(make_llm):
    port = _free_port()
    llm = make_llm(metrics_port=port)
    labels = {"model": "spin-tiny", "algorithm": "dense", "tiers": "dense"}
    name = "spin_ray_generation_tokens_total"
    before = prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0  # the process's
    llm.generate(["Hello there"], SamplingParams(max_tokens=4, ignore_eos=True))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = name + '{algorithm="dense",model="spin-tiny",tiers="dense"}'
    assert f"{line} {before + 4}" in text
    with pytest.raises(ValueError, match="metrics_port"):
        make_llm(metrics_port=70000)
