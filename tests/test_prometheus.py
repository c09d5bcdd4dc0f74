"""The metrics end to end against a real Prometheus (Debian's `prometheus` package): `serve run
deploy/app.yaml` under a short bounded load, Prometheus scraping Ray's metrics endpoints found
through Ray's service-discovery file, and every PromQL query of the Grafana dashboard evaluated
through Prometheus's HTTP API. What Prometheus reports agrees with the engine's own
`kv_stats()`; promtool checks the exported metric names."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from spin_ray import SamplingParams
from spin_ray.dashboards.panels import ERROR_RATE, HIT_RATIO, ROWS, WINDOW
from spin_ray.metrics import EngineMetrics, engine_labels
from spin_ray.metrics.prometheus_sink import PrometheusSink

ROOT = Path(__file__).resolve().parents[1]
SERVICE_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")  # Ray's default
API = "http://127.0.0.1:8000"  # deploy/app.yaml's http_options
MODEL = yaml.safe_load((ROOT / "deploy" / "app.yaml").read_text())["applications"][0]["args"][
    "model"
]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: these tests need a real Prometheus. Install Debian's "
            "package: sudo apt-get install -y prometheus (.ci/run does)",
            pytrace=False,
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def _healthy() -> bool:
    try:
        return httpx.get(f"{API}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def served():
    """`serve run deploy/app.yaml`, as a user starts it (metrics reported every second)."""
    started = time.time()
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    serve_cli = Path(sys.executable).with_name("serve")
    process = subprocess.Popen(
        [str(serve_cli), "run", "deploy/app.yaml"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait("serve run deploy/app.yaml to answer /health", _healthy, 300, every_s=2)
        _wait(
            "Ray's service-discovery file",
            lambda: SERVICE_DISCOVERY.exists() and SERVICE_DISCOVERY.stat().st_mtime >= started,
            60,
        )
        yield process
    finally:
        os.killpg(process.pid, signal.SIGINT)  # serve run's Ctrl-C: shut down and stop Ray
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> dict:
        """An instant query's data; a query Prometheus cannot parse fails the test."""
        params = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=30) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus refused {expr!r}: {err.read().decode()}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, or None while it has none."""
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """A Prometheus scraping every Ray node endpoint in the service-discovery file each second."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ray\n    file_sd_configs:\n"
        f"      - files: ['{SERVICE_DISCOVERY}']\n        refresh_interval: 1s\n"
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            _binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = Prometheus(f"http://127.0.0.1:{port}")
        _wait("Prometheus to start", lambda: _ready(client), 60)
        yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


KV_STATS = """
import json, ray
from ray import serve
ray.init(address="auto", log_to_driver=False)
engine = serve.get_deployment_handle("SpinEngine", app_name="spin-ray")
print(json.dumps(engine.kv_stats.remote().result()))
"""
"""Prints the engine's `kv_stats()` (SpinEngine.kv_stats), from a process of its own: a Ray
client in the test process would outlive ray.shutdown() in Serve's handle threads."""


def _engine_kv_stats() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", KV_STATS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ready(client: Prometheus) -> bool:
    try:
        client.query("up")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def loaded(served, prometheus):
    """A short bounded load: long prompts (selections smaller than their contexts), a stream,
    and two bad requests; returns the engine's `kv_stats()` once it is idle and Prometheus has
    the final counters."""
    # every counter starts at zero in Prometheus before the load, so rates cover all of it
    _wait(
        "the engine's counters in Prometheus",
        lambda: prometheus.value("sum(ray_spin_ray_kv_lookups_total)") == 0,
        120,
    )
    client = openai.OpenAI(base_url=f"{API}/v1", api_key="unused", max_retries=0, timeout=300)
    rng = random.Random(0)
    for _ in range(3):
        prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(500))
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello " * 300}], max_tokens=8,
        stream=True,
    )  # fmt: skip
    assert list(stream)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)

    def settled():
        idle = prometheus.value("sum(ray_spin_ray_requests_running)") == 0
        kv = _engine_kv_stats() if idle else None
        got = prometheus.value("sum(ray_spin_ray_kv_lookups_total)")
        return kv if kv is not None and kv["lookups"] > 0 and got == kv["lookups"] else None

    kv = _wait("Prometheus to hold the engine's final counters", settled, 180, every_s=2)
    errors = 'sum(ray_spin_ray_http_responses_total{status=~"400|404"})'
    _wait("Prometheus to hold the API's errors", lambda: prometheus.value(errors) == 2, 60)
    return kv


def _panel_queries():
    return [
        pytest.param(query.expr, id=f"{spec.title}/{query.legend}")
        for _, specs in ROWS
        for spec in specs
        for query in spec.queries
    ]


def _instant(expr: str) -> str:
    """A panel query as Grafana would send it, over a window that holds the whole test."""
    return expr.replace(WINDOW, "10m").replace("$replica", ".*")


@pytest.mark.parametrize("expr", _panel_queries())
@pytest.mark.ray
def test_every_dashboard_query_parses_and_returns_data(expr, loaded, prometheus):
    data = prometheus.query(_instant(expr))
    assert data["result"], f"no data for {expr}"


@pytest.mark.ray
def test_prometheus_agrees_with_the_engines_kv_stats(loaded, prometheus):
    kv = loaded
    assert kv["lookups"] > kv["hits"] > 0  # the selections miss some pages, then reuse them
    assert prometheus.value("sum(ray_spin_ray_kv_hits_total)") == kv["hits"]
    for direction, expected in (("h2d", kv["h2d_bytes"]), ("d2h", kv["d2h_bytes"])):
        expr = f'sum(ray_spin_ray_pcie_bytes_total{{direction="{direction}"}})'
        assert prometheus.value(expr) == expected
    # the dashboard's hit-rate query, over a window holding the whole load (counters from 0)
    ratio = prometheus.value(_instant(HIT_RATIO))
    assert math.isclose(ratio, kv["hits"] / kv["lookups"], rel_tol=1e-9)
    # one engine replica with labels from Ray Serve (deployment, replica, application)
    series = prometheus.query("ray_spin_ray_kv_hits_total")["result"]
    assert len(series) == 1
    labels = series[0]["metric"]
    assert labels["deployment"] == "SpinEngine" and labels["application"] == "spin-ray"
    assert (labels["model"], labels["algorithm"], labels["tiers"]) == (MODEL, "quest", "spin")


@pytest.mark.ray
def test_http_errors_are_counted_by_status(loaded, prometheus):
    assert prometheus.value('sum(ray_spin_ray_http_responses_total{status="400"})') == 1
    assert prometheus.value('sum(ray_spin_ray_http_responses_total{status="404"})') == 1
    # the dashboard's error rate sees them: the series counted from zero before the load
    assert 0 < prometheus.value(_instant(ERROR_RATE)) < 1
    placed = prometheus.value("sum(ray_spin_ray_router_placements_total)")
    assert placed == 4  # three completions and the stream reached an engine


def _promtool_problems(text: str) -> str:
    checked = subprocess.run(
        [_binary("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "" if checked.returncode == 0 else checked.stdout + checked.stderr


@pytest.mark.ray
def test_promtool_finds_no_problem_in_what_ray_exports(loaded):
    targets = json.loads(SERVICE_DISCOVERY.read_text())[0]["targets"]
    checked = 0
    for target in targets:  # each node endpoint's spin-ray families (Ray's own are not ours)
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=30) as r:
            lines = r.read().decode().splitlines()
        ours = [
            RAY_CAMEL_CASE_LABELS.sub("", line)
            for line in lines
            if _family(line).startswith("ray_spin_ray_")
        ]
        if ours:
            assert not _promtool_problems("\n".join(ours) + "\n"), target
            checked += 1
    assert checked, "no spin-ray metric on Ray's endpoints"


RAY_CAMEL_CASE_LABELS = re.compile(
    r'(?:Component|NodeAddress|SessionName|Version|WorkerId)="[^"]*",?'
)
"""Labels Ray adds to every metric of a node, in camelCase (promtool wants snake_case): Ray's
naming, not ours, so they are left out of the check."""


def _family(line: str) -> str:
    """The metric name a line of the text exposition format is about."""
    if line.startswith("# HELP ") or line.startswith("# TYPE "):
        return line.split()[2]
    return line.split("{")[0].split(" ")[0]


def test_promtool_finds_no_problem_in_what_prometheus_client_exports(make_llm):
    llm = make_llm(sparse="quest", token_budget=32, dense_layers=1)
    registry = CollectorRegistry()
    labels = engine_labels(llm.llm_engine.config)
    metrics = EngineMetrics(PrometheusSink(registry), labels, llm.llm_engine.kv_stats())
    llm.llm_engine.stat_loggers.append(metrics)
    llm.generate(["Hello " * 40], SamplingParams(max_tokens=4, ignore_eos=True))
    text = generate_latest(registry).decode()
    assert "spin_ray_kv_lookups_total" in text
    assert not _promtool_problems(text)


@pytest.mark.ray
def test_an_idle_engines_gauges_stay_exported(loaded, prometheus):
    """Ray drops a gauge not set again within two export intervals (1 s each here); the sink
    sets them again, so an idle engine still reports 0 running and its free KV pages."""
    time.sleep(5)
    query = 'sum(ray_spin_ray_requests_running) + count(ray_spin_ray_kv_pages{tier="hbm"})'
    assert prometheus.value(query) == 3  # 0 running; the used, buffer and free HBM series
    free = prometheus.value('sum(ray_spin_ray_kv_pages{tier="hbm", state="free"})')
    assert free == loaded["gpu_pages_total"] - loaded["gpu_pages_used"]
