"""Benchmark figures against their formulas written out by hand, and the runner's arrival loop."""

import dataclasses
import math
import time
from types import SimpleNamespace

import pytest

from spin_ray.bench.report import COMPARISON_COLUMNS, markdown_report, markdown_table
from spin_ray.bench.runner import RequestTiming, RunRecord, drive
from spin_ray.bench.summary import compare_modes, summarize
from spin_ray.bench.workloads import BenchRequest


def _record(mode="spin", kv_stats=None, step_time=4.0, decode_steps=(), prefill_tokens=None):
    timings = (
        # id, input, output, arrival, first token, last token, finished
        RequestTiming("a", 100, 11, 0.0, 0.5, 2.5, 2.5),  # TTFT 500 ms, TPOT 200 ms
        RequestTiming("b", 300, 1, 1.0, 1.25, 1.25, 1.25),  # TTFT 250 ms, no TPOT (one token)
        RequestTiming("c", 200, 5, 2.0, 3.0, 5.0, 5.0),  # TTFT 1000 ms, TPOT 500 ms
    )
    return RunRecord(
        mode=mode,
        request_rate=math.inf,
        duration=5.0,
        step_time=step_time,
        batch_sizes=(1, 2, 3, 2),
        decode_steps=decode_steps,
        timings=timings,
        prefill_tokens=prefill_tokens,
        kv_stats=kv_stats,
        kv_stats_end=None,
    )


def test_figures_follow_their_formulas():
    stats = dict(lookups=200, hits=150, h2d_bytes=2e9, d2h_bytes=1e9, select_time_s=0.4,
                 fetch_time_s=1.0, index_time_s=0.2, attention_time_s=0.5, evictions=7,
                 preemptions=3)  # fmt: skip
    r = summarize(_record(kv_stats=stats))
    assert r["preemptions"] == 3
    timed = summarize(_record(kv_stats=dict(stats, graph_captures=4, graph_capture_s=2.5),
                              decode_steps=((2, 0.5), (3, 0.75)), prefill_tokens=1100))  # fmt: skip
    assert timed["decode_only_s"] == pytest.approx(1.25)
    assert timed["other_steps_s"] == pytest.approx(4.0 - 1.25)  # step_time less decode-only
    assert timed["prefill_tokens"] == 1100
    assert timed["prefill_tok_per_s"] == pytest.approx(1100 / (4.0 - 1.25))
    assert r["prefill_tokens"] is None and r["prefill_tok_per_s"] is None  # vLLM says none
    assert (timed["graph_captures"], timed["graph_capture_s"]) == (4, 2.5)
    assert r["completed"] == 3 and r["request_throughput"] == pytest.approx(3 / 5)
    assert r["output_throughput"] == pytest.approx(17 / 5)
    assert r["total_token_throughput"] == pytest.approx((600 + 17) / 5)
    assert r["ttft_p50"] == pytest.approx(500.0) and r["ttft_mean"] == pytest.approx(1750 / 3)
    assert r["ttft_p99"] == pytest.approx(500 + 0.98 * 500)  # linear between 500 and 1000
    assert r["tpot_p50"] == pytest.approx(350.0) and r["tpot_p99"] == pytest.approx(497.0)
    # arrival to finish: 2500, 250, 3000 ms
    assert r["e2el_p50"] == pytest.approx(2500.0) and r["e2el_mean"] == pytest.approx(5750 / 3)
    assert r["e2el_p99"] == pytest.approx(2500 + 0.98 * 500)
    assert r["mean_batch"] == 2.0 and r["max_batch"] == 3
    assert r["requests"] == [
        dict(request_id="a", input_len=100, output_len=11, arrival_s=0.0, status="finished",
             ttft_ms=pytest.approx(500.0), tpot_ms=pytest.approx(200.0),
             e2el_ms=pytest.approx(2500.0)),
        dict(request_id="b", input_len=300, output_len=1, arrival_s=1.0, status="finished",
             ttft_ms=pytest.approx(250.0), tpot_ms=None, e2el_ms=pytest.approx(250.0)),
        dict(request_id="c", input_len=200, output_len=5, arrival_s=2.0, status="finished",
             ttft_ms=pytest.approx(1000.0), tpot_ms=pytest.approx(500.0),
             e2el_ms=pytest.approx(3000.0)),
    ]  # fmt: skip
    assert r["hbm_hit_rate"] == 0.75 and r["evictions"] == 7
    assert r["h2d_gbps"] == pytest.approx(0.4) and r["d2h_gbps"] == pytest.approx(0.2)
    assert r["select_share"] == pytest.approx(0.1) and r["fetch_share"] == pytest.approx(0.25)
    assert r["index_share"] == pytest.approx(0.05) and r["attention_share"] == pytest.approx(0.125)
    assert r["rest_share"] == pytest.approx(1 - 0.1 - 0.25 - 0.05 - 0.125)
    partly = summarize(_record(kv_stats=dict(stats, attention_time_s=None)))
    assert partly["select_share"] == pytest.approx(0.1) and partly["attention_share"] is None
    assert partly["rest_share"] is None, "an untimed part leaves the rest unknown"


def test_inter_token_latencies_are_the_gaps_between_tokens():
    timings = (
        RequestTiming("a", 100, 3, 0.0, 0.5, 1.0, 1.0, token_times=(0.5, 0.7, 1.0)),
        RequestTiming("b", 100, 1, 0.0, 1.25, 1.25, 1.25, token_times=(1.25,)),  # no gap
        RequestTiming("c", 100, 2, 2.0, 3.0, 3.5, 3.5, token_times=(3.0, 3.5)),
    )
    r = summarize(dataclasses.replace(_record(), timings=timings))
    # gaps: 200, 300 (a), 500 (c) ms
    assert r["itl_mean"] == pytest.approx(1000 / 3) and r["itl_p50"] == pytest.approx(300.0)
    assert r["itl_p99"] == pytest.approx(300 + 0.98 * 200)
    assert summarize(_record())["itl_p50"] is None  # no token times: no gaps, no guess


def test_second_half_throughput_counts_the_tokens_after_half_the_duration():
    timings = (  # the run lasts 5 s: its second half is [2.5, 5]
        RequestTiming("a", 100, 4, 0.0, 0.5, 2.5, 2.5, token_times=(0.5, 1.0, 2.0, 2.5)),
        RequestTiming("b", 100, 3, 0.0, 2.4, 4.0, None, token_times=(2.4, 3.0, 4.0)),
        RequestTiming("c", 100, 2, 2.0, 4.5, 5.0, 5.0, token_times=(4.5, 5.0)),
    )
    r = summarize(dataclasses.replace(_record(), timings=timings))
    # after 2.5 s: a's last token (at 2.5), b's last two, both of c's: 5 tokens in 2.5 s
    assert r["second_half_output_throughput"] == pytest.approx(5 / 2.5)
    assert r["output_throughput"] == pytest.approx(9 / 5)
    assert summarize(_record())["second_half_output_throughput"] is None  # no token times


def test_missing_statistics_stay_missing():
    r = summarize(_record(mode="dense"))
    for key in ("hbm_hit_rate", "h2d_bytes", "h2d_gbps", "select_share", "rest_share"):
        assert r[key] is None
    assert "| dense | inf |" in markdown_table([r])
    assert markdown_table([r]).splitlines()[-1].endswith("| - | - | - | - | - |")


def test_untimed_phases_give_no_shares_and_a_note():
    # under CUDA graphs the engine reports its counters but None seconds (dropped by
    # SpinBenchEngine.kv_stats): the shares stay None and the report says why
    counters = dict(lookups=200, hits=150, h2d_bytes=2e9, d2h_bytes=1e9, evictions=7)
    untimed = summarize(_record(kv_stats=counters))
    assert untimed["hbm_hit_rate"] == 0.75
    for key in ("select_share", "fetch_share", "index_share", "attention_share", "rest_share"):
        assert untimed[key] is None
    times = dict(select_time_s=0.0, fetch_time_s=0.0, index_time_s=0.0, attention_time_s=1.0)
    timed = summarize(_record(mode="dense", kv_stats=dict(counters, **times)))
    assert timed["select_share"] == 0.0 and timed["rest_share"] == pytest.approx(0.75)
    no_stats = summarize(_record(mode="vllm"))
    report = markdown_report([timed, untimed, no_stats], [], {})
    notes = [line for line in report.splitlines() if "--enforce-eager" in line]
    assert notes == ["spin: no time shares; they need --enforce-eager (CUDA graphs replay the "
                     "decode steps untimed)"]  # fmt: skip
    assert "--enforce-eager" not in markdown_report([timed, no_stats], [], {})


def test_goal_ratios_between_modes():
    dense = dict(mode="dense", request_rate="inf", output_throughput=100.0,
                 second_half_output_throughput=110.0, ttft_p50=7000.0,
                 tpot_p50=20.0, mean_batch=10.0, decode_step_ms_by_batch={1: 5.0})  # fmt: skip
    naive = dict(dense, mode="sparse-naive", tpot_p50=40.0)
    spin = dict(mode="spin", request_rate="inf", output_throughput=300.0,
                second_half_output_throughput=385.0, ttft_p50=1000.0,
                tpot_p50=22.0, mean_batch=25.0, decode_step_ms_by_batch={2: 6.0})  # fmt: skip
    (row,) = compare_modes([dense, naive, spin])
    assert row["throughput_vs_dense"] == 3.0 and row["ttft_p50_speedup_vs_dense"] == 7.0
    assert row["second_half_throughput_vs_dense"] == pytest.approx(3.5)
    assert row["tpot_p50_vs_dense"] == pytest.approx(1.1) and row["mean_batch_vs_dense"] == 2.5
    assert row["tpot_p50_reduction_vs_sparse_naive"] == pytest.approx(0.45)
    # no batch size in common: no same-batch comparison
    assert row["same_batch_size"] is None and row["decode_step_vs_dense_same_batch"] is None


def test_decode_steps_compare_at_the_largest_common_batch_size():
    def steps(batch, *ms):
        return tuple((batch, m / 1e3) for m in ms)

    dense = _record(
        mode="dense",
        decode_steps=steps(1, 5, 5, 5, 5, 5, 5)
        + steps(2, 10, 12, 11, 13, 14)
        + steps(4, 20, 22, 21, 23),  # 4 steps: too few, dropped
    )
    spin = _record(
        decode_steps=steps(1, 4, 4, 4)  # 3 steps: too few, dropped
        + steps(2, 12, 15, 13, 30, 14)
        + steps(4, 25, 25, 25, 25, 25)
        + steps(8, 40, 41, 42, 43, 44, 45),
    )
    d, s = summarize(dense), summarize(spin)
    assert d["decode_step_ms_by_batch"] == {1: pytest.approx(5.0), 2: pytest.approx(12.0)}
    assert s["decode_step_ms_by_batch"] == {
        2: pytest.approx(14.0),
        4: pytest.approx(25.0),
        8: pytest.approx(42.5),
    }
    (row,) = compare_modes([d, s])
    assert row["same_batch_size"] == 2  # 4 would be larger, but dense ran it too rarely
    assert row["decode_step_vs_dense_same_batch"] == pytest.approx(14.0 / 12.0)
    table = markdown_table([row], COMPARISON_COLUMNS)
    assert "| same batch | spin/dense decode step at same batch |" in table.splitlines()[0]
    assert table.splitlines()[-1].endswith("| 2 | 1.17x | - | - | - |")  # no sparse-naive, vllm


class _RecordingEngine:
    """Answers each request with one token per step once its prompt is in (one step per prompt
    token after the first, like a chunked prefill, each counted in `last_step_tokens`);
    remembers when requests were added."""

    mode = "fake"

    def __init__(self):
        self.added_at: dict[str, float] = {}
        self.left: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.prefill_left: dict[str, int] = {}

    def add(self, request, arrival_time):
        self.added_at[request.request_id] = time.monotonic()
        self.prefill_left[request.request_id] = len(request.prompt_token_ids) - 1
        self.left[request.request_id] = request.output_len
        self.done[request.request_id] = 0

    def step(self):
        outputs = []
        self.tokens = 0
        for rid in list(self.left):
            self.tokens += 1  # a prompt token or a decode
            if self.prefill_left[rid]:
                self.prefill_left[rid] -= 1
                continue
            self.left[rid] -= 1
            self.done[rid] += 1
            finished = self.left[rid] == 0
            outputs.append(
                SimpleNamespace(
                    request_id=rid,
                    outputs=[SimpleNamespace(token_ids=[0] * self.done[rid])],
                    finished=finished,
                )
            )
            if finished:
                del self.left[rid]
        return outputs

    def last_step_tokens(self):
        return self.tokens

    def has_unfinished(self):
        return bool(self.left)

    def abort(self, request_id):
        del self.left[request_id]

    def kv_stats(self):
        return None


def test_requests_join_no_earlier_than_their_arrival():
    engine = _RecordingEngine()
    requests = [BenchRequest(f"r{i}", [1, 2], output_len=3) for i in range(3)]
    arrivals = [0.0, 0.05, 0.02]
    record = drive(engine, requests, arrivals, request_rate=20.0, progress=False)
    start = engine.added_at["r0"]  # no earlier than the run's own start
    for request, arrival in zip(requests, arrivals, strict=True):
        assert engine.added_at[request.request_id] - start >= arrival
    assert [t.output_len for t in record.timings] == [3, 3, 3]
    for t in record.timings:
        assert t.arrival <= t.first_token <= t.last_token == t.finished <= record.duration
        assert len(t.token_times) == 3 and t.token_times[0] == t.first_token
        assert t.token_times[-1] == t.last_token and sorted(t.token_times) == list(t.token_times)
    assert sum(record.batch_sizes) == 9


def test_max_concurrency_holds_requests_until_one_finishes():
    class Counting(_RecordingEngine):
        most = 0

        def add(self, request, arrival_time):
            super().add(request, arrival_time)
            self.most = max(self.most, len(self.left))
            self.arrival_times = {**getattr(self, "arrival_times", {}),
                                  request.request_id: arrival_time}  # fmt: skip

    engine = Counting()
    requests = [BenchRequest(f"r{i}", [1], output_len=3) for i in range(5)]
    record = drive(engine, requests, [0.0] * 5, math.inf, False, max_concurrency=2)
    assert engine.most == 2 and all(t.output_len == 3 for t in record.timings)
    by_id = {t.request_id: t for t in record.timings}
    # r0, r1 go at once; each later one waits for a finish and is timed from when it is sent
    assert by_id["r0"].arrival == by_id["r1"].arrival == 0.0
    for rid in ("r2", "r3", "r4"):
        assert by_id[rid].arrival > 0.0
        assert by_id[rid].arrival >= min(t.finished for t in record.timings if t.finished)
        assert engine.arrival_times[rid] - engine.arrival_times["r0"] == pytest.approx(
            by_id[rid].arrival
        )
    assert summarize(record)["max_batch"] == 2


def test_time_limit_aborts_and_marks_the_run_truncated():
    engine = _RecordingEngine()
    requests = [BenchRequest(f"r{i}", [1], output_len=10**9) for i in range(2)]
    requests.append(BenchRequest("queued", [1] * 10**6, output_len=1))  # never out of prefill
    requests.append(BenchRequest("late", [1], output_len=1))
    record = drive(engine, requests, [0.0, 0.0, 0.0, 60.0], math.inf, False, time_limit=0.05)
    # the run stops at the first step boundary past the limit, and counts until then
    assert record.truncated and record.duration > 0.05
    assert all(t.last_token <= record.duration for t in record.timings[:2])
    assert not engine.has_unfinished() and "late" not in engine.added_at
    r = summarize(record)
    assert r["completed"] == 0 and r["truncated"]
    assert r["output_throughput"] == pytest.approx(r["output_tokens"] / record.duration)
    # the queued request waited the whole run for its first token: it counts (a lower bound);
    # the late one was never sent
    assert record.timings[2].first_token is None and r["ttft_censored"] == 1
    served = [(t.first_token - t.arrival) * 1e3 for t in record.timings[:2]]
    assert r["ttft_mean"] == pytest.approx((sum(served) + record.duration * 1e3) / 3)
    assert r["arrived"] == 3  # the late one arrives after the limit
    rows = {row["request_id"]: row for row in r["requests"]}
    assert [rows[i]["status"] for i in ("r0", "r1", "queued", "late")] == [
        "running", "running", "waiting", "not arrived"
    ]  # fmt: skip
    assert rows["queued"]["ttft_ms"] == pytest.approx(record.duration * 1e3)  # the lower bound
    assert rows["late"]["ttft_ms"] is rows["late"]["tpot_ms"] is rows["late"]["e2el_ms"] is None
    assert rows["r0"]["e2el_ms"] is None and rows["r0"]["ttft_ms"] == pytest.approx(served[0])
    report = markdown_report([r], [], {})
    assert "0/4 requests finished (3 arrived by then); 1 had no first token yet" in report
    # unfinished requests' TPOT runs to their latest token
    for t in record.timings[:2]:
        assert t.finished is None and t.output_len >= 2 and t.last_token > t.first_token
    tpots = sorted(
        (t.last_token - t.first_token) / (t.output_len - 1) * 1e3 for t in record.timings[:2]
    )
    assert r["tpot_p50"] == pytest.approx(sum(tpots) / 2)


def test_decode_steps_are_the_steps_without_a_first_token():
    engine = _RecordingEngine()
    requests = [BenchRequest("short", [1], output_len=3), BenchRequest("long", [1, 2], 3)]
    record = drive(engine, requests, [0.0, 0.0], math.inf, progress=False)
    # step 1: short's first token; step 2: short's second, long's first (mixed);
    # step 3: both decode; step 4: long's last token
    assert record.batch_sizes == (1, 2, 2, 1)
    assert [batch for batch, _ in record.decode_steps] == [2, 1]
    assert all(seconds >= 0 for _, seconds in record.decode_steps)
    assert sum(seconds for _, seconds in record.decode_steps) <= record.step_time


def test_a_step_with_a_prefill_chunk_is_no_decode_step():
    """A step where a request still in its prompt rides along with decodes is not timed as a
    decode step of the decoding batch (it also computed the chunk)."""
    engine = _RecordingEngine()
    requests = [BenchRequest("short", [1], output_len=4), BenchRequest("long", [1, 2, 3], 2)]
    record = drive(engine, requests, [0.0, 0.0], math.inf, progress=False)
    # step 1: short's first token, long's prompt; step 2: short decodes beside long's prompt;
    # step 3: short decodes, long's first token; step 4: both decode
    assert record.batch_sizes == (1, 1, 2, 2)
    assert [batch for batch, _ in record.decode_steps] == [2]


def test_repeated_runs_compare_run_by_run_and_by_median():
    def result(mode, repeat, throughput, tpot):
        return dict(mode=mode, request_rate="inf", repeat=repeat, output_throughput=throughput,
                    second_half_output_throughput=throughput, ttft_p50=100.0, tpot_p50=tpot,
                    mean_batch=2.0, decode_step_ms_by_batch={})  # fmt: skip

    results = [result("dense", i, 100.0, 10.0) for i in (1, 2, 3)]
    results += [result("spin", i, t, 20.0) for i, t in enumerate((50.0, 300.0, 200.0), start=1)]
    results += [result("sparse-naive", i, 10.0, 40.0) for i in (1, 2, 3)]
    rows = compare_modes(results)
    assert [r["repeat"] for r in rows] == [1, 2, 3, "median"]
    assert [r["throughput_vs_dense"] for r in rows] == pytest.approx([0.5, 3.0, 2.0, 2.0])
    assert rows[-1]["tpot_p50_reduction_vs_sparse_naive"] == pytest.approx(0.5)
    assert (
        rows[-1]["same_batch_size"] is None and rows[-1]["decode_step_vs_dense_same_batch"] is None
    )
    single = compare_modes([r for r in results if r["repeat"] == 1])
    assert [r["repeat"] for r in single] == [1], "one run: no median row"
