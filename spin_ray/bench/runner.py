"""Drive engines through a workload: requests join at their arrival times while the engine
steps, and every request's first-token and finish times are taken when `step()` returns them
(the client's view, as `vllm bench serve` takes it; identical for every engine)."""

from __future__ import annotations

import bisect
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from spin_ray.bench.config import BenchConfig
from spin_ray.bench.engines import BenchEngine, build_engine, vllm_installed
from spin_ray.bench.workloads import (
    BenchRequest,
    arrival_times,
    build_requests,
    sample_lengths,
)
from spin_ray.engine.config import DEFAULT_CHUNK_TOKENS, WARMUP_OUTPUT_TOKENS

COUNTER_STATS = (
    "preemptions",
    "lookups",
    "hits",
    "h2d_bytes",
    "prefetched_bytes",
    "d2h_bytes",
    "evictions",
    "select_time_s",
    "fetch_time_s",
    "index_time_s",
    "attention_time_s",
    "graph_captures",
    "graph_capture_s",
)
"""Cumulative `kv_stats()` fields whose change over a run the summary uses."""


@dataclass(frozen=True)
class RequestTiming:
    """One request's life, seconds since the run started."""

    request_id: str
    input_len: int
    output_len: int
    """Tokens generated."""
    arrival: float
    """When it was sent: its planned arrival, or later if `max_concurrency` requests were in
    flight then (TTFT counts from here, the engine's queueing included, as `vllm bench serve`
    counts it)."""
    first_token: float | None
    last_token: float | None
    """When its latest token came (its finish, unless a time limit cut it short)."""
    finished: float | None
    token_times: tuple[float, ...] = ()
    """When each of its tokens came (inter-token latencies are their differences)."""


@dataclass(frozen=True)
class RunRecord:
    """What one mode did at one request rate."""

    mode: str
    request_rate: float
    duration: float
    """First arrival to last finish, seconds."""
    step_time: float
    """Seconds spent inside `step()` (the rest is waiting for arrivals)."""
    batch_sizes: tuple[int, ...]
    """Requests that got a token, for each step that produced tokens."""
    decode_steps: tuple[tuple[int, float], ...]
    """(batch size, seconds inside `step()`) of each step that only decoded: every output
    belongs to a request that already had its first token, and the step computed one token per
    output (no prefill chunk rode along). Empty for engines that do not report their steps'
    tokens (vLLM)."""
    timings: tuple[RequestTiming, ...]
    prefill_tokens: int | None
    """Prompt tokens the steps computed (a preempted request's again); None for engines that
    do not report their steps' tokens (vLLM)."""
    kv_stats: dict[str, float] | None
    """Change of the `COUNTER_STATS` over the run; None where the engine keeps none."""
    kv_stats_end: dict[str, float] | None
    """Every numeric `kv_stats()` field at the end of the run."""
    truncated: bool = False
    """The time limit stopped the run; unfinished requests were aborted."""
    repeat: int = 1
    """Which of the `BenchConfig.repeats` runs of this mode and rate (from 1)."""


@dataclass(frozen=True)
class BenchRun:
    records: list[RunRecord]
    skipped: dict[str, str]
    """Mode → why it did not run."""
    failed: dict[str, str]
    """Mode → the error that stopped it (the other modes still ran)."""


def drive(
    engine: BenchEngine,
    requests: list[BenchRequest],
    arrivals: list[float],
    request_rate: float,
    progress: bool = True,
    time_limit: float | None = None,
    max_concurrency: int | None = None,
) -> RunRecord:
    """Send `requests` at `arrivals` (seconds from now), at most `max_concurrency` in flight
    (a request due while that many are waits for one to finish), and step `engine` until all
    finish, or until `time_limit` seconds have passed (then the unfinished requests are
    aborted)."""
    order = sorted(range(len(requests)), key=lambda i: arrivals[i])
    sent: dict[str, float] = {}
    due = [arrivals[i] for i in order]  # arrival times in sending order
    held = 0  # requests (in sending order) once held back by max_concurrency
    token_times: dict[str, list[float]] = {}  # request id -> when each of its tokens came
    finished: dict[str, float] = {}
    generated: dict[str, int] = {}
    batch_sizes: list[int] = []
    decode_steps: list[tuple[int, float]] = []
    prefill_tokens: int | None = 0
    step_time = 0.0
    stats_before = engine.kv_stats()
    bar = tqdm(
        total=sum(r.output_len for r in requests),
        desc=f"{engine.mode} @ {_rate_label(request_rate)} req/s",
        unit="tok",
        disable=not progress,
        leave=False,
    )
    start = time.monotonic()
    next_index = 0
    truncated = False
    try:
        while next_index < len(order) or engine.has_unfinished():
            now = time.monotonic() - start
            if time_limit is not None and now > time_limit:
                truncated, stopped = True, now  # past the limit by at most one step
                for i in order[:next_index]:
                    if requests[i].request_id not in finished:
                        engine.abort(requests[i].request_id)
                break
            while (
                next_index < len(order)
                and arrivals[order[next_index]] <= now
                and (max_concurrency is None or next_index - len(finished) < max_concurrency)
            ):
                i = order[next_index]
                # held back by max_concurrency: sent now, and timed from now (as vLLM does)
                sent[requests[i].request_id] = now if next_index < held else arrivals[i]
                engine.add(requests[i], arrival_time=start + sent[requests[i].request_id])
                next_index += 1
            # requests due now but not sent wait for max_concurrency: the first `held` in order
            held = max(held, bisect.bisect_right(due, now))
            if not engine.has_unfinished():
                time.sleep(max(0.0, arrivals[order[next_index]] - (time.monotonic() - start)))
                continue
            step_start = time.monotonic()
            outputs = engine.step()
            step_end = time.monotonic()
            step_time += step_end - step_start
            step_tokens = engine.last_step_tokens()
            if step_tokens is None:
                prefill_tokens = None
            elif prefill_tokens is not None:  # less one token per decode row
                prefill_tokens += step_tokens - sum(
                    1 for o in outputs if generated.get(o.request_id)
                )
            if outputs:
                batch_sizes.append(len(outputs))
                if _decode_only(engine, outputs, generated):
                    decode_steps.append((len(outputs), step_end - step_start))
            for output in outputs:
                rid = output.request_id
                count = len(output.outputs[0].token_ids)
                new = count - generated.get(rid, 0)
                if new > 0:
                    bar.update(new)
                    token_times.setdefault(rid, []).extend([step_end - start] * new)
                generated[rid] = count
                if output.finished:
                    finished[rid] = step_end - start
    finally:
        bar.close()
    stats_after = engine.kv_stats()
    timings = []
    for i, r in enumerate(requests):
        times = tuple(token_times.get(r.request_id, ()))
        timings.append(RequestTiming(
            request_id=r.request_id,
            input_len=len(r.prompt_token_ids),
            output_len=generated.get(r.request_id, 0),
            arrival=float(sent.get(r.request_id, arrivals[i])),
            first_token=times[0] if times else None,
            last_token=times[-1] if times else None,
            finished=finished.get(r.request_id),
            token_times=times,
        ))  # fmt: skip
    ends = [t.finished for t in timings if t.finished is not None]
    return RunRecord(
        mode=engine.mode,
        request_rate=request_rate,
        duration=stopped if truncated else max(ends, default=time.monotonic() - start),
        step_time=step_time,
        batch_sizes=tuple(batch_sizes),
        decode_steps=tuple(decode_steps),
        timings=tuple(timings),
        prefill_tokens=prefill_tokens,
        kv_stats=_counter_change(stats_before, stats_after),
        kv_stats_end=stats_after,
        truncated=truncated,
    )


def warm_up(engine: BenchEngine, request: BenchRequest, config: BenchConfig) -> None:
    """Run short copies of `request` so compilation and graph capture stay out of the timing:
    two at once (decode batches of 2 and 1), each prompt one and a half prefill chunks long (a
    chunk over a prefix: the second chunk's paths compile too)."""
    chunk = config.option("max_num_batched_tokens") or DEFAULT_CHUNK_TOKENS
    prompt = request.prompt_token_ids[: chunk + chunk // 2]
    copies = WARMUP_OUTPUT_TOKENS[: config.option("max_num_seqs")]
    for i, output_len in enumerate(copies):
        warmup = BenchRequest(f"warmup-{i}-{request.request_id}", prompt, output_len)
        engine.add(warmup, arrival_time=time.monotonic())
    while engine.has_unfinished():
        engine.step()


def run_benchmark(
    config: BenchConfig,
    log: Callable[[str], None] = print,
    on_record: Callable[[RunRecord], None] | None = None,
) -> BenchRun:
    """Every mode, one engine at a time (its memory freed before the next), at every rate;
    `on_record` sees each record as soon as it is made."""
    input_lens, output_lens = sample_lengths(config.workload)
    longest = int((input_lens + output_lens).max())
    page_size = config.option("page_size")
    max_model_len = config.option("max_model_len") or -(-longest // page_size) * page_size
    requests: list[BenchRequest] | None = None
    records: list[RunRecord] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    modes = list(config.modes)
    if "vllm" in modes and not vllm_installed():  # said up front, not after the other modes
        modes.remove("vllm")
        skipped["vllm"] = "vllm is not installed"
        log("vllm is not installed: skipping mode vllm")
    for mode in modes:
        log(f"[{mode}] building the engine")
        try:
            engine = build_engine(mode, config, max_model_len)
        except Exception as err:  # a mode that cannot start must not cost the others their run
            failed[mode] = _failure(mode, err, log)
            continue
        try:
            if requests is None:
                requests = build_requests(
                    config.workload, engine.vocab_size, engine.special_token_ids
                )
            if config.warmup:
                warm_up(engine, requests[0], config)
            for rate in config.request_rates:
                arrivals = arrival_times(
                    len(requests), rate, config.workload.seed, config.burstiness
                ).tolist()
                for repeat in range(1, config.repeats + 1):
                    record = drive(engine, requests, arrivals, rate, config.progress,
                                   config.time_limit, config.max_concurrency)  # fmt: skip
                    record = replace(record, repeat=repeat)
                    records.append(record)
                    cut = " (time limit: truncated)" if record.truncated else ""
                    run = f", run {repeat}/{config.repeats}" if config.repeats > 1 else ""
                    log(f"[{mode}] request rate {_rate_label(rate)}{run}: "
                        f"{record.duration:.2f} s{cut}")  # fmt: skip
                    if on_record is not None:
                        on_record(record)
        except Exception as err:
            failed[mode] = _failure(mode, err, log)
        finally:
            engine.close()
    return BenchRun(records=records, skipped=skipped, failed=failed)


def _failure(mode: str, err: Exception, log: Callable[[str], None]) -> str:
    log(f"[{mode}] failed:\n{traceback.format_exc()}")
    return f"{type(err).__name__}: {err}"


def _decode_only(engine: BenchEngine, outputs: list, generated: dict[str, int]) -> bool:
    """The step that produced `outputs` only decoded (`generated`: tokens before the step)."""
    return engine.last_step_tokens() == len(outputs) and all(
        generated.get(output.request_id, 0) for output in outputs
    )


def _counter_change(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in COUNTER_STATS if k in after and k in before}


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
