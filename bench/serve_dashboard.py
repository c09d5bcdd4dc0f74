"""What the Grafana dashboard shows under a long-context load: `serve run` of deploy/app.yaml
(SPIN on, as shipped; --model and the KV sizes replaced for the machine), a real Prometheus
scraping Ray's metrics endpoints through Ray's service-discovery file, requests of the
benchmark's LongBench-v2-like workload over the OpenAI HTTP API, then every panel query of the
dashboard over the load window (Prometheus's query_range API).

    python bench/serve_dashboard.py --model llama-3.1-8b --prometheus /tmp/prometheus \\
        --scale 0.5 --num-prompts 16 --request-rate 0.2 \\
        --engine-args '{"gpu_cache_tokens": 131072, "cpu_cache_tokens": 393216}' --out results/

Writes, under --out: queries.json (every panel query's time series), summary.md (the
dashboard's headline figures over the load: hit rate, PCIe GB/s each way, tokens/s, TTFT and
TPOT), and dashboard.png (the key panels, drawn with matplotlib from query_range's data:
Grafana itself is not installed where this runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import yaml

from spin_ray.bench.workloads import WorkloadSpec, arrival_times, build_requests
from spin_ray.dashboards.panels import ROWS, WINDOW

ROOT = Path(__file__).resolve().parents[1]
SERVICE_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")
API = "http://127.0.0.1:8000"
STEP_S = 2  # scrape interval and query_range step
HEADLINE = {  # summary.md: panel title → (its query's legend, how to print a value, scale)
    "HBM hit rate": ("all replicas", "{:.1%}", 1),
    "PCIe traffic": ("{{direction}}", "{:.2f} GB/s", 1e-9),
    "Tokens per second": ("generation", "{:.1f} tok/s", 1),
    "Time to first token": ("p50", "{:.2f} s", 1),
    "Time per output token": ("p50", "{:.1f} ms", 1e3),
}
DRAWN = (  # dashboard.png, in this order
    "HBM hit rate per replica",
    "PCIe traffic",
    "KV pages by tier and state",
    "Tokens per second",
    "Time to first token",
    "Requests running and waiting",
)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = write_app_config(args)
    started = time.time()
    serve_run = subprocess.Popen(
        [sys.executable, "-m", "ray.serve.scripts", "run", str(config)],
        env={**os.environ, "RAY_metrics_report_interval_ms": str(STEP_S * 1000)},
        stdout=open(out / "serve.log", "w"),  # noqa: SIM115 (open while it serves)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    prometheus = None
    try:
        wait("the API", lambda: healthy(), args.start_timeout)
        wait("Ray's service discovery", lambda: fresh(SERVICE_DISCOVERY, started), 60)
        prometheus, url = start_prometheus(args.prometheus, out)
        wait("Prometheus", lambda: query(url, "up") is not None, 60)
        log(f"serving after {time.time() - started:.0f} s; load starts")
        load_start = time.time()
        results = asyncio.run(send_load(args))
        load_end = time.time()
        time.sleep(3 * STEP_S)  # the last reports reach Prometheus
        log(f"load: {len(results)} requests in {load_end - load_start:.0f} s")
        series = panel_series(url, load_start - 4 * STEP_S, load_end + 2 * STEP_S)
        (out / "queries.json").write_text(json.dumps(series, indent=1))
        summary = summarize(url, series, results, load_start, load_end, args)
        (out / "summary.md").write_text(summary)
        print(summary)
        draw(series, out / "dashboard.png", args.model, load_start)
    finally:
        if prometheus is not None:
            prometheus.terminate()
        os.killpg(serve_run.pid, signal.SIGINT)
        try:
            serve_run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve_run.pid, signal.SIGKILL)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--engine-args", default="{}", help="JSON: engine_args to replace")
    p.add_argument("--prometheus", default="prometheus", help="the prometheus binary")
    p.add_argument("--workload", default="longbench-v2")
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=None, help="replaces sampled outputs")
    p.add_argument("--request-rate", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=480)
    p.add_argument("--out", default="serve-dashboard")
    return p.parse_args()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(1)


def healthy() -> bool:
    try:
        return httpx.get(f"{API}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def fresh(path: Path, since: float) -> bool:
    return path.exists() and path.stat().st_mtime >= since


def write_app_config(args: argparse.Namespace) -> Path:
    """deploy/app.yaml as shipped, with this machine's model, KV sizes and one replica."""
    config = yaml.safe_load((ROOT / "deploy" / "app.yaml").read_text())
    app = config["applications"][0]["args"]
    app["model"] = args.model
    app["engine_args"].update(json.loads(args.engine_args))
    app["engine"]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    path = Path(tempfile.mkdtemp()) / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(binary: str, out: Path) -> tuple[subprocess.Popen, str]:
    folder = Path(tempfile.mkdtemp())
    (folder / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {STEP_S}s\n"
        "scrape_configs:\n  - job_name: ray\n    file_sd_configs:\n"
        f"      - files: ['{SERVICE_DISCOVERY}']\n        refresh_interval: {STEP_S}s\n"
    )
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'data'}", "--web.listen-address=127.0.0.1:9090"],
        stdout=open(out / "prometheus.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    return process, "http://127.0.0.1:9090"


def api(url: str, path: str, **params) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}") as r:
            answer = json.load(r)
    except OSError:
        return None
    return answer["data"] if answer["status"] == "success" else None


def query(url: str, expr: str, at: float | None = None) -> list | None:
    data = api(url, "/api/v1/query", query=expr, **({} if at is None else {"time": at}))
    return None if data is None else data["result"]


async def send_load(args: argparse.Namespace) -> list[dict]:
    """The workload's requests at Poisson arrivals, streamed; per request its TTFT and tokens."""
    spec = WorkloadSpec(
        name=args.workload, num_prompts=args.num_prompts, scale=args.scale,
        output_len=args.output_len, seed=args.seed,
    )  # fmt: skip
    requests = build_requests(spec, vocab_size=256, special_token_ids=[])  # byte tokenizer
    arrivals = arrival_times(len(requests), args.request_rate, args.seed).tolist()
    async with httpx.AsyncClient(base_url=API, timeout=None) as client:
        start = time.monotonic()

        async def one(request, at: float) -> dict:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - start)))
            sent = time.monotonic()
            body = {
                "model": args.model, "prompt": request.prompt_token_ids,
                "max_tokens": request.output_len, "ignore_eos": True, "stream": True,
            }  # fmt: skip
            first, chunks = None, 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.monotonic()
                        chunks += 1
            return {"input": len(request.prompt_token_ids), "output": request.output_len,
                    "ttft_s": first - sent, "e2e_s": time.monotonic() - sent}  # fmt: skip

        return await asyncio.gather(*(one(r, at) for r, at in zip(requests, arrivals)))


def panel_series(url: str, start: float, end: float) -> dict:
    """Every panel query over [start, end]: {panel: {legend: {"expr", "series": [...]}}}."""
    window = f"{4 * STEP_S}s"  # Grafana's $__rate_interval at this scrape interval
    series = {}
    for _, specs in ROWS:
        for spec in specs:
            for q in spec.queries:
                expr = q.expr.replace(WINDOW, window).replace("$replica", ".*")
                data = api(url, "/api/v1/query_range", query=expr, start=start, end=end,
                           step=STEP_S)  # fmt: skip
                result = [] if data is None else data["result"]
                series.setdefault(spec.title, {})[q.legend] = {"expr": expr, "series": result}
    return series


def summarize(url, series, results, start, end, args) -> str:
    """The headline figures over the whole load (rates over the load window)."""
    span = f"{int(end - start) + 2 * STEP_S}s"
    lines = [
        f"model {args.model}, {args.workload} x{args.scale}, {args.num_prompts} requests at "
        f"{args.request_rate} req/s, load {end - start:.0f} s",
        "",
        "| dashboard panel (query over the load window) | value |",
        "|---|---|",
    ]
    for title, (legend, fmt, scale) in HEADLINE.items():
        expr = series[title][legend]["expr"].replace(f"{4 * STEP_S}s", span)
        result = query(url, expr, at=end + 2 * STEP_S) or []
        for item in result or [{"value": [0, "nan"]}]:
            label = item.get("metric", {}).get("direction", legend)
            value = fmt.format(float(item["value"][1]) * scale)
            lines.append(f"| {title} ({label}) | {value} |")
    pcie = query(url, f"sum by (direction) (increase(ray_spin_ray_pcie_bytes_total[{span}]))",
                 at=end + 2 * STEP_S) or []  # fmt: skip
    for item in pcie:
        lines.append(f"| PCIe bytes over the load ({item['metric']['direction']}) | "
                     f"{float(item['value'][1]) / 1e9:.1f} GB |")  # fmt: skip
    ttfts = sorted(r["ttft_s"] for r in results)
    lines.append(f"| client-side TTFT p50 | {ttfts[len(ttfts) // 2]:.2f} s |")
    return "\n".join(lines) + "\n"


def draw(series: dict, path: Path, model: str, start: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), constrained_layout=True)
    for ax, title in zip(axes.flat, DRAWN):
        for legend, q in series[title].items():
            for item in q["series"]:
                times = [float(t) - start for t, _ in item["values"]]
                values = [float(v) for _, v in item["values"]]
                name = legend
                for key, value in item.get("metric", {}).items():
                    name = name.replace("{{" + key + "}}", value)
                ax.plot(times, values, ".-", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("seconds since the load started")
        ax.legend(fontsize=7)
    fig.suptitle(f"spin-ray dashboard queries (Prometheus query_range), {model}")
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
