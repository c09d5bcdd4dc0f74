"""The Ray Serve application under a long-context workload: N engine replicas (one per GPU)
behind the KV working-set router, every replica's load and KV use sampled side by side.

    python bench/serve_replicas.py --model llama-3.1-8b --device cuda --num-replicas 2 \\
        --engine-args '{"sparse": "quest", "token_budget": 512, "gpu_cache_tokens": 16384}' \\
        --long 8 --long-len 24000 --short 8 --short-len 2000 --output-len 32 --out results/

All requests are sent at once through the OpenAI HTTP API (streamed completions, ignore_eos);
a sampler reads every replica's routing report (`engine_replica_stats`) every
`--sample-period` seconds. Prints Markdown tables and writes summary.json and samples.csv.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import http.client
import json
import random
import socket
import string
import threading
import time
from pathlib import Path

import ray
from ray import serve

from spin_ray.serve import build_app
from spin_ray.serve.replica_stats import engine_replica_stats

APP = "spin-bench"


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = args.num_replicas if args.device == "cuda" else 0
    ray.init(num_gpus=gpus, include_dashboard=False, object_store_memory=2 * 10**9)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine_args = {"device": args.device, "dtype": args.dtype, **json.loads(args.engine_args)}
    app_args = {
        "model": args.model,
        "engine_args": engine_args,
        "engine": {
            "num_gpus": 1 if gpus else 0,
            "num_cpus": args.cpus_per_replica,
            "num_replicas": args.num_replicas,
            "max_ongoing_requests": args.max_ongoing,
            "routing_stats_period_s": args.stats_period,
            "stale_after_s": 10 * args.stats_period,
        },
    }
    started = time.monotonic()
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    deploy_s = time.monotonic() - started
    print(f"deployed {args.num_replicas} replicas in {deploy_s:.1f} s", flush=True)

    samples: list[dict] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(samples, stop, args.sample_period))
    sampler.start()
    rng = random.Random(0)
    requests = [("long", args.long_len)] * args.long + [("short", args.short_len)] * args.short
    rng.shuffle(requests)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [
            pool.submit(_stream, port, args.model, kind, _text(rng, length), args, t0)
            for kind, length in requests
        ]
        results = [f.result() for f in futures]
    wall_s = time.monotonic() - t0
    stop.set()
    sampler.join()
    serve.shutdown()

    summary = _summarize(results, samples, wall_s, deploy_s, args, app_args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]) if samples else ["t"])
        writer.writeheader()
        writer.writerows(samples)
    _print_tables(summary)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spin-tiny")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-ongoing", type=int, default=64)
    p.add_argument("--engine-args", default="{}", help="JSON: more spin_ray.LLM arguments")
    p.add_argument("--long", type=int, default=8, help="long requests")
    p.add_argument("--long-len", type=int, default=24000, help="prompt tokens of a long one")
    p.add_argument("--short", type=int, default=8, help="short requests")
    p.add_argument("--short-len", type=int, default=2000, help="prompt tokens of a short one")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=180.0, help="per request, seconds")
    p.add_argument("--stats-period", type=float, default=0.5, help="routing report period")
    p.add_argument("--sample-period", type=float, default=0.25)
    p.add_argument("--out", default="serve-bench")
    return p.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(rng: random.Random, tokens: int) -> str:
    # The byte-level tokenizer (spin-tiny's, also used by named shapes) makes one token per
    # ASCII character, plus BOS.
    return "".join(rng.choices(string.ascii_letters + " ", k=tokens - 1))


def _stream(port: int, model: str, kind: str, prompt: str, args, t0: float) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": args.output_len,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    first = None
    tokens = 0
    status = None
    # http.client (standard library) streams the server-sent events line by line.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=args.time_limit)
    try:
        connection.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        status = response.status
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                if chunk["choices"] and first is None:
                    first = time.monotonic()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except OSError as err:
        status = f"error: {err!r}"
    finally:
        connection.close()
    done = time.monotonic()
    return {
        "kind": kind,
        "prompt_tokens": len(prompt) + 1,
        "status": status,
        "tokens": tokens,
        "sent_s": sent - t0,
        "ttft_s": None if first is None else first - sent,
        "latency_s": done - sent,
    }


def _sample(samples: list, stop: threading.Event, period: float) -> None:
    t0 = time.monotonic()
    last_print = -10.0
    while not stop.is_set():
        t = time.monotonic() - t0
        stats = sorted(engine_replica_stats(APP).items())
        if t - last_print >= 2.0:  # a trace in the log, should the run be cut short
            last_print = t
            print(
                f"t={t:5.1f}s "
                + " | ".join(
                    f"{r}: run {s.num_running} wait {s.num_waiting} hbm {s.hbm_pages_used}/"
                    f"{s.hbm_pages_total} host {s.host_pages_used}/{s.host_pages_total}"
                    for r, s in stats
                ),
                flush=True,
            )
        for replica, s in stats:
            samples.append(
                {
                    "t": round(t, 3),
                    "replica": replica,
                    "running": s.num_running,
                    "waiting": s.num_waiting,
                    "tokens": s.running_tokens,
                    "hbm_used": s.hbm_pages_used,
                    "hbm_committed": s.hbm_pages_committed,
                    "hbm_total": s.hbm_pages_total,
                    "host_used": s.host_pages_used,
                    "host_committed": s.host_pages_committed,
                    "host_total": s.host_pages_total,
                }
            )
        stop.wait(period)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summarize(results, samples, wall_s, deploy_s, args, app_args) -> dict:
    classes = {}
    for kind in ("long", "short"):
        rs = [r for r in results if r["kind"] == kind]
        ok = [r for r in rs if r["status"] == 200 and r["ttft_s"] is not None]
        classes[kind] = {
            "requests": len(rs),
            "ok": len(ok),
            "ttft_p50_s": _pct([r["ttft_s"] for r in ok], 0.5),
            "ttft_max_s": max((r["ttft_s"] for r in ok), default=None),
            "latency_p50_s": _pct([r["latency_s"] for r in ok], 0.5),
            "latency_max_s": max((r["latency_s"] for r in ok), default=None),
        }
    replicas = {}
    for replica in sorted({s["replica"] for s in samples}):
        rows = [s for s in samples if s["replica"] == replica]
        busy = [s for s in rows if s["running"] + s["waiting"] > 0] or rows
        replicas[replica] = {
            "samples": len(rows),
            "running_mean": sum(s["running"] for s in busy) / len(busy),
            "running_max": max(s["running"] for s in rows),
            "waiting_max": max(s["waiting"] for s in rows),
            "tokens_max": max(s["tokens"] for s in rows),
            "hbm_total": rows[0]["hbm_total"],
            "hbm_used_mean": sum(s["hbm_used"] for s in busy) / len(busy),
            "hbm_used_max": max(s["hbm_used"] for s in rows),
            "hbm_committed_max": max(s["hbm_committed"] for s in rows),
            "host_total": rows[0]["host_total"],
            "host_used_max": max(s["host_used"] for s in rows),
        }
    tokens = sum(r["tokens"] for r in results)
    return {
        "args": vars(args),
        "app_args": app_args,
        "deploy_s": deploy_s,
        "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s,
        "classes": classes,
        "replicas": replicas,
        "results": results,
    }


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _print_tables(summary: dict) -> None:
    print(
        f"\nwall {summary['wall_s']:.1f} s, {summary['output_tokens_per_s']:.1f} output "
        f"tokens/s over all requests; deploy {summary['deploy_s']:.1f} s\n"
    )
    print("| requests | sent | ok | TTFT p50 s | TTFT max s | latency p50 s | latency max s |")
    print("|---|---|---|---|---|---|---|")
    for kind, c in summary["classes"].items():
        print(
            f"| {kind} | {c['requests']} | {c['ok']} | {_fmt(c['ttft_p50_s'])} | "
            f"{_fmt(c['ttft_max_s'])} | {_fmt(c['latency_p50_s'])} | "
            f"{_fmt(c['latency_max_s'])} |"
        )
    print(
        "\n| replica | running mean (busy) | running max | waiting max | tokens max | "
        "HBM pages used mean / max / total | HBM committed max | host pages used max / total |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for replica, r in summary["replicas"].items():
        print(
            f"| {replica} | {r['running_mean']:.1f} | {r['running_max']} | {r['waiting_max']} "
            f"| {r['tokens_max']} | {r['hbm_used_mean']:.0f} / {r['hbm_used_max']} / "
            f"{r['hbm_total']} | {r['hbm_committed_max']} | {r['host_used_max']} / "
            f"{r['host_total']} |"
        )


if __name__ == "__main__":
    main()
