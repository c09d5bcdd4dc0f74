"""Soak the Ray Serve application on 127.0.0.1: mixed long and short requests, streamed and
not, random client aborts, an overload burst, and one engine replica killed (Ray Serve starts
another), for a bounded time. Every request must end in one well-formed outcome.

    python bench/serve_soak.py --duration 600 --out soak/      # the 10-minute run
    python bench/serve_soak.py --duration 60 --out soak/       # CI's (tests/test_serve_soak.py)

Each request is classified: completed (a whole answer, or a stream ending in `[DONE]`), clean
error (OpenAI's error JSON, or a stream's error event followed by `[DONE]`), aborted (the client
hung up on purpose), or lost (anything else: a cut stream, a timeout, a malformed answer).
At the end, with the load gone: the requests and KV pages each replica still holds, and the
resident memory of every Serve process at the start and the end. Writes report.json and prints
a Markdown table; exits 1 if a request was lost or a page or request was left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import ray
from ray import serve

from spin_ray.serve import build_app
from spin_ray.serve.replica_stats import engine_replica_stats

APP = "spin-soak"
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUEST_TIMEOUT_S = 120.0
MEMORY_EVERY_S = 60.0


def app_args() -> dict:
    return {
        "model": "spin-tiny",
        "api_key": KEY,
        "retry_after_s": 1,
        "engine_args": {
            "device": "cpu",
            "max_model_len": 4096,
            "num_pages": 512,
            "max_num_seqs": 16,
        },  # fmt: skip
        "engine": {
            "num_gpus": 1,
            "num_cpus": 0,
            "num_replicas": 2,
            "max_ongoing_requests": 8,
            "max_queued_requests": 16,
            "routing_stats_period_s": 0.5,
            "stale_after_s": 2.0,
        },  # fmt: skip
        "ingress": {"num_cpus": 0},
    }


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args()), name=APP, route_prefix="/")
        memory = [(0.0, serve_memory())]
        outcomes = asyncio.run(soak(f"http://127.0.0.1:{port}", args, memory))
        leftovers = wait_idle()
        memory.append((args.duration, serve_memory()))
        report = summarize(outcomes, leftovers, memory, args.duration)
    finally:
        serve.shutdown()
        ray.shutdown()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    failed = report["lost"] or report["pages_left"] or report["requests_left"]
    sys.exit(1 if failed else 0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=6, help="steady client tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="soak")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def soak(url: str, args: argparse.Namespace, memory: list) -> list[str]:
    """Steady clients for the whole duration; an overload burst at a third of it and a
    replica killed at half of it; the processes' memory sampled every `MEMORY_EVERY_S` into
    `memory`. Returns every request's outcome."""
    outcomes: list[str] = []
    start = time.monotonic()
    deadline = start + args.duration
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as http:

        async def client(rng: random.Random) -> None:
            while time.monotonic() < deadline:
                outcome = await one_request(http, rng)
                outcomes.append(outcome)
                if outcome.startswith("error 503"):  # as clients do: wait Retry-After
                    await asyncio.sleep(1.0)

        async def events() -> None:
            await asyncio.sleep(args.duration / 3)
            burst = [one_request(http, random.Random(i)) for i in range(60)]
            outcomes.extend(await asyncio.gather(*burst))
            await asyncio.sleep(max(0.0, deadline - time.monotonic() - args.duration / 2))
            await asyncio.to_thread(kill_one_replica)

        async def sample_memory() -> None:
            while time.monotonic() + MEMORY_EVERY_S < deadline:
                await asyncio.sleep(MEMORY_EVERY_S)
                memory.append((time.monotonic() - start, await asyncio.to_thread(serve_memory)))

        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency)]
        await asyncio.gather(events(), sample_memory(), *(client(rng) for rng in rngs))
    return outcomes


async def one_request(http: httpx.AsyncClient, rng: random.Random) -> str:
    """Send one random request; its outcome."""
    long = rng.random() < 0.3
    prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1500, 3000) if long
                                                          else rng.randint(20, 200)))  # fmt: skip
    stream = rng.random() < 0.5
    body = {"model": "spin-tiny", "prompt": prompt, "max_tokens": rng.randint(8, 48),
            "stream": stream, "ignore_eos": True}  # fmt: skip
    if rng.random() < 0.2:  # the chat endpoint, without max_tokens
        body = {"model": "spin-tiny", "stream": stream, "stop": ["e"],
                "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    abort = stream and rng.random() < 0.15
    try:
        if not stream:
            response = await http.post(path, json=body)
            return classify_json(response)
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return classify_json(response)
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if abort:
                        return "aborted"
            return classify_stream(events)
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return f"lost: {type(err).__name__}"


def classify_json(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except json.JSONDecodeError:
        return f"lost: {response.status_code} not JSON"
    if response.status_code == 200 and payload.get("choices"):
        return "completed"
    error = payload.get("error") or {}
    if response.status_code >= 400 and error.get("message"):
        return f"error {response.status_code} {error.get('code')}"
    return f"lost: {response.status_code} malformed"


def classify_stream(events: list[str]) -> str:
    if not events or events[-1] != "[DONE]":
        return "lost: stream without [DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    if chunks and "error" in chunks[-1]:
        return f"error stream {chunks[-1]['error'].get('code')}"
    return "completed"


def kill_one_replica() -> None:
    """Kill one engine replica's process (Ray Serve starts a new one) and wait until two run."""
    stats = engine_replica_stats(APP)
    victim = sorted(stats)[0]
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#SpinEngine#{victim}", namespace="serve")
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        replicas = engine_replica_stats(APP)
        if len(replicas) == 2 and victim not in replicas:
            return
        time.sleep(1)
    raise TimeoutError("the killed replica was not replaced within 120 s")


def wait_idle(timeout_s: float = 120.0) -> dict[str, dict]:
    """Each replica's requests and pages once the load is gone (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_replica_stats(APP)
        left = {rid: {"requests": s.num_running + s.num_waiting,
                      "pages": s.hbm_pages_used + s.host_pages_used}
                for rid, s in stats.items()}  # fmt: skip
        idle = all(v["requests"] == 0 and v["pages"] == 0 for v in left.values())
        if (idle and len(stats) == 2) or time.monotonic() > deadline:
            return left
        time.sleep(1)


def serve_memory() -> dict[str, float]:
    """Resident MB of every Serve process on this machine (controller, proxy, replicas)."""
    memory = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if title.startswith("ray::Serve") or title.startswith("ray::ProxyActor"):
            rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS:"))  # fmt: skip
            memory[f"{title} ({proc.name})"] = rss_kb / 1024
    return memory


def summarize(outcomes, leftovers, memory, duration_s) -> dict:
    kinds = Counter(outcomes)
    (_, memory_start), (_, memory_end) = memory[0], memory[-1]
    lost = sum(n for kind, n in kinds.items() if kind.startswith("lost"))
    errors = {kind: n for kind, n in kinds.items() if kind.startswith("error")}
    common = set(memory_start) & set(memory_end)  # processes alive at both ends
    return {
        "duration_s": duration_s,
        "sent": len(outcomes),
        "completed": kinds["completed"],
        "clean_errors": sum(errors.values()),
        "errors_by_kind": errors,
        "aborted_by_client": kinds["aborted"],
        "lost": lost,
        "lost_by_kind": {k: n for k, n in kinds.items() if k.startswith("lost")},
        "requests_left": sum(v["requests"] for v in leftovers.values()),
        "pages_left": sum(v["pages"] for v in leftovers.values()),
        "memory_mb_start": memory_start,
        "memory_mb_end": memory_end,
        "memory_growth_mb": {p: round(memory_end[p] - memory_start[p], 1) for p in sorted(common)},
        "memory_mb_over_time": {  # each process alive at both ends: (seconds, MB) samples
            p: [(round(t), round(sample[p], 1)) for t, sample in memory if p in sample]
            for p in sorted(common)
        },
    }


def markdown(report: dict) -> str:
    rows = [("duration", f"{report['duration_s']:.0f} s"), ("requests sent", report["sent"]),
            ("completed", report["completed"]), ("clean errors", report["clean_errors"]),
            ("aborted by the client", report["aborted_by_client"]), ("lost", report["lost"]),
            ("requests left at the end", report["requests_left"]),
            ("KV pages left at the end", report["pages_left"])]  # fmt: skip
    lines = ["| soak | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines += ["", f"clean errors by kind: {report['errors_by_kind']}", "",
              "| process (alive at both ends) | RSS growth MB | RSS MB over time (s: MB) |",
              "|---|---|---|"]  # fmt: skip
    lines += [
        f"| {p} | {g} | {', '.join(f'{t}: {mb}' for t, mb in report['memory_mb_over_time'][p])} |"
        for p, g in report["memory_growth_mb"].items()
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
