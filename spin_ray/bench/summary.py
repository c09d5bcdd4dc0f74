"""Figures of one run (throughput, latency percentiles, batch, cache traffic, time shares) and
the ratios between modes that the project's goals are stated in."""

from __future__ import annotations

import math

import numpy as np

from spin_ray.bench.runner import RunRecord

UNITS = {
    "request_throughput": "requests/s",
    "output_throughput": "output tokens/s",
    "second_half_output_throughput": "output tokens/s over the run's second half (tokens that "
    "came after duration / 2): an offline run starts from an empty engine, and the whole-run "
    "figure averages that ramp in; in a run to the end the second half holds the drain of the "
    "last requests instead. None without per-token times",
    "total_token_throughput": "input + output tokens/s",
    "ttft_*": "ms, arrival (planned; with --max-concurrency, when sent) to first token; in a "
    "truncated run a request that arrived but got no token counts as (time limit - arrival), "
    "a lower bound (see ttft_censored)",
    "preemptions": "requests preempted during the run (their KV dropped and computed again)",
    "ttft_censored": "requests whose TTFT is that lower bound (0 unless the run was truncated)",
    "arrived": "requests whose arrival came before the run's end (num_requests unless truncated): "
    "the ones the TTFT and TPOT figures cover",
    "tpot_*": "ms, (last token - first token) / (output tokens - 1), per request with 2+",
    "itl_*": "ms, inter-token latency: the gaps between a request's consecutive tokens, over "
    "every request (the stalls a mean TPOT hides: a prefill chunk or a graph capture in a step)",
    "e2el_*": "ms, arrival (as for TTFT) to finish, per finished request",
    "*_bytes": "bytes",
    "*_gbps": "GB/s (1e9 bytes) over the run's duration",
    "*_share": "fraction of the time spent inside step(); attention is decode attention (prefill "
    "counts in rest); None where the phases went untimed (CUDA-graph decode: --enforce-eager)",
    "duration": "s, first arrival to last finish (when truncated: to the end of the step that "
    "crossed the time limit)",
    "decode_only_s": "s inside step() in decode-only steps (see decode_step_ms_by_batch), the "
    "steps that captured a graph (graph_capture_s) included",
    "other_steps_s": "s inside the other steps: those with a prefill chunk (and, for vLLM, all)",
    "prefill_tokens": "prompt tokens computed during the run (a preempted request's again; "
    "None for vLLM)",
    "prefill_tok_per_s": "prefill_tokens / other_steps_s: the prefill rate of the steps with a "
    "prefill chunk, decodes riding along included",
    "graph_captures": "decode CUDA graphs captured during the run (a new batch layout or shape; "
    "None without graphs)",
    "graph_capture_s": "s of the steps that captured them (their eager run, any compilation of "
    "a new shape, the capture)",
    "decode_step_ms_by_batch": "batch size -> median ms inside step() of the decode-only steps "
    "(every output a request's second or later token, no prefill chunk in the step) of that "
    "size, for sizes with MIN_STEPS_PER_BATCH or more such steps",
    "second_half_throughput_vs_dense": "spin / dense second_half_output_throughput",
    "same_batch_size": "largest batch size in both spin's and dense's decode_step_ms_by_batch",
    "decode_step_vs_dense_same_batch": "spin / dense median decode step ms at same_batch_size",
    "requests": "one row per request, in workload order: request_id, input_len, output_len "
    "(tokens generated), arrival_s (s from the run's start), status (finished, running: cut "
    "off after its first token, waiting: no first token at the limit, its ttft_ms the lower "
    "bound above, not arrived), ttft_ms, tpot_ms, e2el_ms (None where there is none)",
    "repeat": 'which run of a mode and rate (--repeats), from 1; in comparisons also "median": '
    "the median of each ratio over the runs",
}

MIN_STEPS_PER_BATCH = 5
"""Decode steps a batch size needs before its median step time is reported."""

TIME_SHARES = (
    ("select", "select_time_s"),
    ("fetch", "fetch_time_s"),
    ("index", "index_time_s"),
    ("attention", "attention_time_s"),
)
"""(share name, `kv_stats()` field of seconds it is computed from)."""


def summarize(record: RunRecord) -> dict:
    """Per-mode figures of `record`; a figure the engine cannot supply is None, never a guess."""
    done = [t for t in record.timings if t.finished is not None]
    duration = record.duration
    requests = request_rows(record)
    ttfts = [row["ttft_ms"] for row in requests if row["ttft_ms"] is not None]
    tpots = [row["tpot_ms"] for row in requests if row["tpot_ms"] is not None]
    e2els = [row["e2el_ms"] for row in requests if row["e2el_ms"] is not None]
    itls = [gap * 1e3 for t in record.timings for gap in np.diff(t.token_times)]
    token_times = [at for t in record.timings for at in t.token_times]
    output_tokens = sum(t.output_len for t in record.timings)
    input_tokens = sum(t.input_len for t in done)
    stats = record.kv_stats or {}
    decode_only = sum(seconds for _, seconds in record.decode_steps)
    other_steps = record.step_time - decode_only
    lookups, hits = stats.get("lookups"), stats.get("hits")
    figures = {
        "mode": record.mode,
        "request_rate": "inf" if math.isinf(record.request_rate) else record.request_rate,
        "num_requests": len(record.timings),
        "arrived": sum(row["status"] != "not arrived" for row in requests),
        "completed": len(done),
        "truncated": record.truncated,
        "repeat": record.repeat,
        "duration": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "second_half_output_throughput": (
            sum(at >= duration / 2 for at in token_times) / (duration / 2) if token_times else None
        ),
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **_percentiles("ttft", ttfts),
        "ttft_censored": sum(row["status"] == "waiting" for row in requests),
        **_percentiles("tpot", tpots),
        **_percentiles("itl", itls),
        **_percentiles("e2el", e2els),
        "mean_batch": float(np.mean(record.batch_sizes)) if record.batch_sizes else None,
        "max_batch": max(record.batch_sizes, default=None),
        "num_steps_with_tokens": len(record.batch_sizes),
        "decode_step_ms_by_batch": _median_step_ms_by_batch(record.decode_steps),
        "decode_only_s": decode_only,
        "other_steps_s": other_steps,
        "prefill_tokens": record.prefill_tokens,
        "prefill_tok_per_s": (
            record.prefill_tokens / other_steps if record.prefill_tokens and other_steps else None
        ),
        "graph_captures": stats.get("graph_captures"),
        "graph_capture_s": stats.get("graph_capture_s"),
        "preemptions": stats.get("preemptions"),
        "hbm_hit_rate": hits / lookups if lookups else None,
        "lookups": lookups,
        "hits": hits,
        "evictions": stats.get("evictions"),
    }
    for direction in ("h2d", "d2h"):
        moved = stats.get(f"{direction}_bytes")
        figures[f"{direction}_bytes"] = moved
        figures[f"{direction}_gbps"] = moved / duration / 1e9 if moved is not None else None
    figures["prefetched_bytes"] = stats.get("prefetched_bytes")  # of h2d_bytes: lookahead
    figures.update(_time_shares(stats, record.step_time))
    figures["kv_stats_end"] = record.kv_stats_end
    figures["requests"] = requests
    return figures


def request_rows(record: RunRecord) -> list[dict]:
    """One row per request of `record`, in workload order: what the TTFT, TPOT and E2EL
    percentiles are taken over, kept so a truncated run's censored TTFTs can be told apart."""
    rows = []
    for t in record.timings:
        if t.finished is not None:
            status = "finished"
        elif t.first_token is not None:
            status = "running"  # cut off by the time limit after its first token
        elif t.arrival < record.duration:
            status = "waiting"
        else:
            status = "not arrived"
        if t.first_token is not None:
            ttft = (t.first_token - t.arrival) * 1e3
        elif status == "waiting":
            # it waited at least until the truncated run stopped: leaving it out would flatter
            # the mode that queued it
            ttft = (record.duration - t.arrival) * 1e3
        else:
            ttft = None
        rows.append({
            "request_id": t.request_id,
            "input_len": t.input_len,
            "output_len": t.output_len,
            "arrival_s": t.arrival,
            "status": status,
            "ttft_ms": ttft,
            # an unfinished request of a truncated run counts up to its latest token
            "tpot_ms": (
                (t.last_token - t.first_token) / (t.output_len - 1) * 1e3
                if t.output_len > 1 else None
            ),
            "e2el_ms": (t.finished - t.arrival) * 1e3 if t.finished is not None else None,
        })  # fmt: skip
    return rows


def compare_modes(results: list[dict]) -> list[dict]:
    """At each request rate, `spin` against `dense` and `sparse-naive`: the goal ratios. TPOT
    p50s come from different batch sizes (spin batches more), so `spin` is also compared with
    `dense` by median decode step time at the largest batch size both ran often enough.
    Where vLLM ran too, spin's and dense's throughput are also given as ratios to its.
    With repeated runs, run i of each mode is compared with run i of the others, and each rate
    gets a row more (`repeat` "median") with the median of every ratio over the runs."""
    by_key = {(r["mode"], str(r["request_rate"]), r.get("repeat", 1)): r for r in results}
    comparisons = []
    for (mode, rate, repeat), spin in by_key.items():
        if mode != "spin":
            continue
        row = {"request_rate": spin["request_rate"], "repeat": repeat}
        dense = by_key.get(("dense", rate, repeat))
        if dense is not None:
            row["throughput_vs_dense"] = _ratio(
                spin["output_throughput"], dense["output_throughput"]
            )
            row["second_half_throughput_vs_dense"] = _ratio(
                spin["second_half_output_throughput"], dense["second_half_output_throughput"]
            )
            row["ttft_p50_speedup_vs_dense"] = _ratio(dense["ttft_p50"], spin["ttft_p50"])
            row["tpot_p50_vs_dense"] = _ratio(spin["tpot_p50"], dense["tpot_p50"])
            row["mean_batch_vs_dense"] = _ratio(spin["mean_batch"], dense["mean_batch"])
            spin_steps = spin["decode_step_ms_by_batch"]
            dense_steps = dense["decode_step_ms_by_batch"]
            size = max(spin_steps.keys() & dense_steps.keys(), default=None)
            row["same_batch_size"] = size
            row["decode_step_vs_dense_same_batch"] = (
                None if size is None else _ratio(spin_steps[size], dense_steps[size])
            )
        vllm = by_key.get(("vllm", rate, repeat))
        if vllm is not None:  # real vLLM on the same requests: checks dense and spin alike
            theirs = vllm["output_throughput"]
            row["throughput_vs_vllm"] = _ratio(spin["output_throughput"], theirs)
            ours = dense["output_throughput"] if dense is not None else None
            row["dense_throughput_vs_vllm"] = _ratio(ours, theirs)
        naive = by_key.get(("sparse-naive", rate, repeat))
        if naive is not None:
            ratio = _ratio(spin["tpot_p50"], naive["tpot_p50"])
            row["tpot_p50_reduction_vs_sparse_naive"] = None if ratio is None else 1.0 - ratio
        comparisons.append(row)
    return comparisons + _medians(comparisons)


def _medians(comparisons: list[dict]) -> list[dict]:
    """Per rate compared in more than one run: the median of each ratio over the runs that
    have it (`same_batch_size` differs between runs, so it has none)."""
    by_rate: dict[str, list[dict]] = {}
    for row in comparisons:
        by_rate.setdefault(str(row["request_rate"]), []).append(row)
    medians = []
    for rows in by_rate.values():
        if len(rows) < 2:
            continue
        row = {"request_rate": rows[0]["request_rate"], "repeat": "median"}
        for key in rows[0].keys() - row.keys():
            values = [r[key] for r in rows if r[key] is not None]
            row[key] = float(np.median(values)) if values and key != "same_batch_size" else None
        medians.append({key: row[key] for key in rows[0]})  # the runs' key order
    return medians


def _percentiles(name: str, values_ms: list[float]) -> dict:
    if not values_ms:
        return {f"{name}_mean": None, f"{name}_p50": None, f"{name}_p99": None}
    values = np.asarray(values_ms)
    return {
        f"{name}_mean": float(values.mean()),
        f"{name}_p50": float(np.percentile(values, 50)),
        f"{name}_p99": float(np.percentile(values, 99)),
    }


def _median_step_ms_by_batch(steps: tuple[tuple[int, float], ...]) -> dict[int, float]:
    """Batch size → median step ms, over batch sizes with `MIN_STEPS_PER_BATCH` steps or more."""
    by_batch: dict[int, list[float]] = {}
    for batch, seconds in steps:
        by_batch.setdefault(batch, []).append(seconds * 1e3)
    return {
        batch: float(np.median(ms))
        for batch, ms in sorted(by_batch.items())
        if len(ms) >= MIN_STEPS_PER_BATCH
    }


def _time_shares(stats: dict, step_time: float) -> dict:
    """Shares of the time inside `step()`; `rest_share` is what the parts leave (None unless
    every part was timed)."""
    shares = {}
    for name, field in TIME_SHARES:
        seconds = stats.get(field)
        shares[f"{name}_share"] = seconds / step_time if seconds is not None and step_time else None
    parts = list(shares.values())
    shares["rest_share"] = None if None in parts else 1.0 - sum(parts)
    return shares


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
