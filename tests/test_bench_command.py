"""`spin-ray bench` end to end on spin-tiny on the CPU: JSON with every field, table, plots."""

import json
import math
import socket
import urllib.request

import numpy as np
import prometheus_client
import pytest

from spin_ray.cli import main

RESULT_FIELDS = {
    "mode",
    "request_rate",
    "num_requests",
    "arrived",
    "completed",
    "truncated",
    "repeat",
    "duration",
    "input_tokens",
    "output_tokens",
    "request_throughput",
    "output_throughput",
    "second_half_output_throughput",
    "total_token_throughput",
    "ttft_mean",
    "ttft_p50",
    "ttft_p99",
    "ttft_censored",
    "tpot_mean",
    "tpot_p50",
    "tpot_p99",
    "itl_mean",
    "itl_p50",
    "itl_p99",
    "e2el_mean",
    "e2el_p50",
    "e2el_p99",
    "mean_batch",
    "max_batch",
    "num_steps_with_tokens",
    "decode_step_ms_by_batch",
    "decode_only_s",
    "other_steps_s",
    "prefill_tokens",
    "prefill_tok_per_s",
    "graph_captures",
    "graph_capture_s",
    "preemptions",
    "hbm_hit_rate",
    "lookups",
    "hits",
    "evictions",
    "h2d_bytes",
    "h2d_gbps",
    "prefetched_bytes",
    "d2h_bytes",
    "d2h_gbps",
    "select_share",
    "fetch_share",
    "index_share",
    "attention_share",
    "rest_share",
    "kv_stats_end",
    "requests",
}
MODES = ["dense", "dense-offload", "sparse-naive", "spin"]
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 200, 6
GPU_CACHE_TOKENS = 1024


def test_bench_runs_every_mode_and_writes_every_field(tmp_path, capsys):
    out = tmp_path / "results.json"
    plots = tmp_path / "plots"
    argv = [
        "bench",
        "--model", "spin-tiny",
        "--device", "cpu",
        "--modes", ",".join(MODES + ["vllm"]),
        "--num-prompts", str(NUM_PROMPTS),
        "--input-len", str(INPUT_LEN),
        "--output-len", str(OUTPUT_LEN),
        "--token-budget", "64",
        "--gpu-cache-tokens", str(GPU_CACHE_TOKENS),
        "--request-rate", "50,inf",
        "--output", str(out),
        "--plot-dir", str(plots),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    document = json.loads(out.read_text())

    assert document["environment"]["torch"] and document["environment"]["date"]
    assert document["config"]["workload"]["input_len"] == INPUT_LEN
    assert document["config"]["request_rates"] == [50.0, "inf"]
    results = document["results"]
    assert [(r["mode"], r["request_rate"]) for r in results] == [
        (mode, rate) for mode in MODES for rate in (50.0, "inf")
    ]
    for r in results:
        assert set(r) == RESULT_FIELDS
        assert r["completed"] == r["arrived"] == NUM_PROMPTS and not r["truncated"]
        assert r["ttft_censored"] == 0
        rows = r["requests"]  # one per request, every one finished with its own TTFT
        assert [row["request_id"] for row in rows] == [f"bench-{i}" for i in range(NUM_PROMPTS)]
        assert all(row["status"] == "finished" for row in rows)
        assert [row["input_len"] for row in rows] == [INPUT_LEN] * NUM_PROMPTS
        assert [row["output_len"] for row in rows] == [OUTPUT_LEN] * NUM_PROMPTS
        assert r["ttft_p50"] == pytest.approx(float(np.median([row["ttft_ms"] for row in rows])))
        assert r["preemptions"] == 0  # every mode's cache holds the whole workload
        assert r["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert r["input_tokens"] == NUM_PROMPTS * INPUT_LEN
        assert r["output_throughput"] == pytest.approx(r["output_tokens"] / r["duration"])
        # at most every token in half the time: the last token ends the run, so never zero
        late = r["second_half_output_throughput"] * r["duration"] / 2
        assert 1 <= round(late) <= r["output_tokens"]
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and 0 < r["tpot_p50"] <= r["tpot_p99"]
        assert 0 < r["itl_p50"] <= r["itl_p99"]  # one gap per token after a request's first
        assert 1 <= r["mean_batch"] <= r["max_batch"] <= NUM_PROMPTS
        # JSON keys are strings; batch sizes of decode steps, each with a positive median
        for batch, ms in r["decode_step_ms_by_batch"].items():
            assert 1 <= int(batch) <= NUM_PROMPTS and ms > 0
        # inside step(): the decode-only steps and the rest; no CUDA graphs on the CPU
        assert r["decode_only_s"] > 0 and r["other_steps_s"] > 0
        assert r["decode_only_s"] + r["other_steps_s"] <= r["duration"]
        assert r["prefill_tokens"] == r["input_tokens"]  # every prompt once, no preemption
        assert r["prefill_tok_per_s"] == pytest.approx(r["prefill_tokens"] / r["other_steps_s"])
        assert r["graph_captures"] is None and r["graph_capture_s"] is None
    for r in results:
        if r["request_rate"] == "inf":
            assert r["max_batch"] == NUM_PROMPTS  # all arrive at once, all decode together
        if r["mode"] == "dense":
            assert r["hbm_hit_rate"] is None and not r["h2d_bytes"]
            # --gpu-cache-tokens sizes dense's KV pool too (pages count per layer and KV head)
            assert r["kv_stats_end"]["gpu_pages_total"] == GPU_CACHE_TOKENS // 16 * 4 * 2
            # dense selects and fetches nothing, but its decode attention takes real time
            assert r["select_share"] == r["fetch_share"] == r["index_share"] == 0.0
            assert 0 < r["attention_share"] < 1 and 0 < r["rest_share"] < 1
        else:  # KV lives in the CPU tier: pages cross PCIe, lookups are counted
            assert r["h2d_bytes"] > 0 and r["d2h_bytes"] > 0 and r["lookups"] > 0
            assert r["h2d_gbps"] == pytest.approx(r["h2d_bytes"] / r["duration"] / 1e9)
            assert r["select_share"] >= 0 and r["fetch_share"] > 0 and r["rest_share"] < 1
            assert r["attention_share"] > 0
    by_mode = {r["mode"]: r for r in results if r["request_rate"] == "inf"}
    assert by_mode["sparse-naive"]["hbm_hit_rate"] == 0.0  # no buffer: nothing is reused
    assert 0 < by_mode["spin"]["hbm_hit_rate"] <= 1
    assert by_mode["spin"]["h2d_bytes"] < by_mode["sparse-naive"]["h2d_bytes"]
    assert [c["request_rate"] for c in document["comparisons"]] == [50.0, "inf"]
    assert all(c["throughput_vs_dense"] > 0 for c in document["comparisons"])
    for c in document["comparisons"]:
        assert {"same_batch_size", "decode_step_vs_dense_same_batch"} <= set(c)
    # offline, the three requests get their first tokens together and then decode
    # OUTPUT_LEN - 1 = 5 steps at batch 3: enough steps for a median at that size
    assert all(set(r["decode_step_ms_by_batch"]) == {"3"} for r in by_mode.values())
    offline = document["comparisons"][-1]
    assert offline["same_batch_size"] == 3 and offline["decode_step_vs_dense_same_batch"] > 0

    if not document["environment"]["vllm"]:
        assert document["skipped_modes"] == {"vllm": "vllm is not installed"}
        assert document["failed_modes"] == {}
        assert "vllm is not installed" in captured.err
    for mode in MODES:  # the results table and the comparison, once, on stdout
        assert captured.out.count(f"| {mode} |") == 2
        assert f"| {mode} |" not in captured.err  # stderr has a progress line per run
        for rate in (50.0, "inf"):
            assert f"done: {mode} at rate {rate}, run 1: 3/3 requests" in captured.err
    # --sparse was not given: the run names the algorithm its sparse modes use
    assert "sparse-naive, spin: sparse algorithm quest (--sparse)" in captured.err
    assert (plots / "throughput.png").stat().st_size > 0
    assert (plots / "latency.png").stat().st_size > 0


@pytest.mark.parametrize(
    "extra,field",
    [
        (["--modes", "dense,turbo"], "modes"),
        (["--request-rate", "fast"], "request_rate"),
        (["--request-rate", "0"], "request_rate"),
        (["--workload", "longbench-v2", "--input-len", "5"], "input_len"),
        (["--sparse", "nope"], "sparse"),
        (["--token-budget", "many"], "token_budget"),
        (["--token-budget", "1.5"], "token_budget"),  # a fraction past 1: SparseConfig says so
        (["--min-buffer-ratio", "-1"], "min_buffer_ratio"),
        (["--repeats", "0"], "repeats"),
        (["--burstiness", "0"], "burstiness"),
        (["--max-concurrency", "0"], "max_concurrency"),
        (["--plot-dir", "plots"], "plot_dir"),  # one rate: nothing to plot against
        (["--model", "no-such-model"], "model"),  # neither folder, hub id nor shape
        (["--dtype", "int8"], "dtype"),
        (["--device", "cuda:1", "--modes", "dense,vllm"], "modes"),
    ],
)
def test_bad_arguments_name_the_field(extra, field, capsys):
    assert main(["bench", "--device", "cpu", *extra]) == 2
    assert f"error: {field}" in capsys.readouterr().err


def test_enforce_eager_reaches_every_engine_and_the_json(tmp_path, monkeypatch):
    import spin_ray.llm

    flags = []

    class RecordingLLM(spin_ray.llm.LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            flags.append(self.llm_engine.config.enforce_eager)

    monkeypatch.setattr(spin_ray.llm, "LLM", RecordingLLM)
    out = tmp_path / "r.json"
    argv = ["bench", "--device", "cpu", "--modes", "dense,spin", "--num-prompts", "1",
            "--input-len", "40", "--output-len", "2", "--no-progress", "--no-warmup",
            "--output", str(out)]  # fmt: skip
    assert main([*argv, "--enforce-eager"]) == 0
    assert flags == [True, True]
    document = json.loads(out.read_text())
    assert document["config"]["engine_options"]["enforce_eager"] is True
    # on the CPU every step runs eagerly, so the phases are timed either way
    assert all(r["rest_share"] is not None for r in document["results"])
    assert main(argv) == 0
    assert flags == [True, True, False, False]
    assert "enforce_eager" not in json.loads(out.read_text())["config"]["engine_options"]


def test_max_concurrency_and_burstiness_reach_the_run(tmp_path):
    out = tmp_path / "c.json"
    argv = ["bench", "--device", "cpu", "--modes", "dense", "--num-prompts", "3",
            "--input-len", "40", "--output-len", "3", "--request-rate", "inf",
            "--burstiness", "0.5", "--max-concurrency", "1", "--no-progress",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert document["config"]["burstiness"] == 0.5
    assert document["config"]["max_concurrency"] == 1
    (result,) = document["results"]
    # all three due at once, sent one at a time: never two in a step, each timed from its send,
    # so their latencies add up to the run (timed from when they were due, the second would
    # count the first's time and the third both: about twice the run)
    assert result["completed"] == 3 and result["max_batch"] == 1
    assert 3 * result["e2el_mean"] <= 1.05 * result["duration"] * 1e3


def test_repeats_run_each_mode_again_and_compare_medians(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--device", "cpu", "--modes", "dense,spin", "--num-prompts", "2",
            "--input-len", "40", "--output-len", "3", "--repeats", "3", "--no-progress",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(out.read_text())
    runs = [(r["mode"], r["repeat"]) for r in document["results"]]
    assert runs == [(mode, i) for mode in ("dense", "spin") for i in (1, 2, 3)]
    assert all(r["completed"] == 2 for r in document["results"])
    per_run = document["comparisons"][:3]
    median = document["comparisons"][3]
    assert [c["repeat"] for c in per_run] == [1, 2, 3] and median["repeat"] == "median"
    by_run = {(r["mode"], r["repeat"]): r for r in document["results"]}
    for c in per_run:  # run i of spin against run i of dense
        spin, dense = by_run["spin", c["repeat"]], by_run["dense", c["repeat"]]
        expected = spin["output_throughput"] / dense["output_throughput"]
        assert c["throughput_vs_dense"] == pytest.approx(expected)
    ratios = sorted(c["throughput_vs_dense"] for c in per_run)
    assert median["throughput_vs_dense"] == pytest.approx(ratios[1])
    assert median["same_batch_size"] is None
    table = capsys.readouterr().out
    assert "| rate | run |" in table and "| inf | median |" in table


def test_rates_and_budget_parse():
    from spin_ray.cli import build_parser
    from spin_ray.commands.bench import bench_config

    args = build_parser().parse_args(
        ["bench", "--request-rate", "1,2.5,inf", "--token-budget", "0.02", "--workload",
         "longgenbench", "--scale", "0.01"]
    )  # fmt: skip
    config = bench_config(args)
    assert config.request_rates == (1.0, 2.5, math.inf)
    assert config.sparse.token_budget == 0.02
    assert config.workload.name == "longgenbench" and config.workload.input_len is None
    args = build_parser().parse_args(["bench", "--token-budget", "2048"])
    assert bench_config(args).sparse.token_budget == 2048
    args = build_parser().parse_args(["bench", "--min-buffer-ratio", "6", "--buffer-ratio", "9"])
    spin = bench_config(args).engine_sparse("spin", 32)
    assert (spin.min_buffer_ratio, spin.buffer_ratio) == (6.0, 9.0)
    assert bench_config(args).engine_sparse("sparse-naive", 32).buffer_ratio == 9.0
    config = bench_config(build_parser().parse_args(["bench", "--lookahead"]))
    assert config.engine_sparse("spin", 32).lookahead is True
    assert config.engine_sparse("sparse-naive", 32).lookahead is False
    assert bench_config(args).engine_sparse("spin", 32).lookahead is False
    args = build_parser().parse_args(["bench", "--lookahead", "--lookahead-share", "0.5"])
    spin = bench_config(args).engine_sparse("spin", 32)
    assert (spin.lookahead, spin.lookahead_share) == (True, 0.5)
    assert bench_config(args).engine_sparse("sparse-naive", 32).lookahead_share == 1.0
    offload = bench_config(args).engine_sparse("dense-offload", 32)
    assert (offload.algorithm.name, offload.tiers, offload.dense_layers) == (
        "full",
        "sparse-naive",
        0,
    )
    assert bench_config(args).engine_sparse("dense", 32) is None
    bad = [
        (["--lookahead-share", "0.5"], "needs lookahead"),
        (["--lookahead", "--lookahead-share", "1.5"], r"in \(0, 1\]"),
    ]
    for flags, message in bad:
        with pytest.raises(ValueError, match=message):
            bench_config(build_parser().parse_args(["bench", *flags]))


def test_a_failing_mode_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    from spin_ray.bench import runner

    def build_engine(mode, config, max_model_len):
        if mode == "spin":
            raise RuntimeError("out of pinned memory")
        return real_build_engine(mode, config, max_model_len)

    real_build_engine = runner.build_engine
    monkeypatch.setattr(runner, "build_engine", build_engine)
    out = tmp_path / "r.json"
    argv = ["bench", "--device", "cpu", "--modes", "spin,dense", "--num-prompts", "1",
            "--input-len", "40", "--output-len", "2", "--no-progress",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "[spin] failed" in captured.err and "out of pinned memory" in captured.err
    assert "spin: not run (failed: RuntimeError: out of pinned memory)" in captured.out
    document = json.loads(out.read_text())
    assert [r["mode"] for r in document["results"]] == ["dense"]
    assert document["failed_modes"] == {"spin": "RuntimeError: out of pinned memory"}
    assert document["skipped_modes"] == {}


def test_spin_holds_the_same_hbm_kv_bytes_as_dense():
    """With both tiers sized, spin's HBM slots (every offloaded layer) plus its dense layers'
    KV (kept in HBM for every CPU-tier token) equal dense's pool of `gpu_cache_tokens` tokens
    of every layer; the other modes get the numbers as given; too little HBM names the field."""
    from spin_ray.bench.config import BenchConfig
    from spin_ray.sparse.config import SparseConfig

    def tiers(gpu, cpu=None):
        return BenchConfig(
            modes=("spin",), sparse=SparseConfig(gpu_cache_tokens=gpu, cpu_cache_tokens=cpu)
        )

    config = tiers(131072, 524288)
    layers, dense = 32, SparseConfig().dense_layers
    slots = config.engine_sparse("spin", layers).gpu_cache_tokens
    assert slots * (layers - dense) + 524288 * dense <= 131072 * layers
    assert (slots + 1) * (layers - dense) + 524288 * dense > 131072 * layers
    assert config.engine_sparse("sparse-naive", layers).gpu_cache_tokens == 131072
    assert tiers(4096).engine_sparse("spin", layers).gpu_cache_tokens == 4096
    with pytest.raises(ValueError, match="gpu_cache_tokens"):
        tiers(4096, 131072).engine_sparse("spin", layers)


def test_warm_up_prefills_two_chunked_copies_and_decodes_them_together():
    """The warm-up sends two copies of the first request's prompt, one and a half prefill
    chunks long (so a chunk over a prefix runs), with 4 and 8 output tokens (decode batches of
    two, then one), and runs them to completion before any timing."""
    from spin_ray.bench.config import BenchConfig
    from spin_ray.bench.engines import build_engine
    from spin_ray.bench.runner import warm_up
    from spin_ray.bench.workloads import BenchRequest

    options = dict(device="cpu", max_num_batched_tokens=64)
    config = BenchConfig(modes=("spin",), engine_options=options, progress=False)
    engine = build_engine("spin", config, max_model_len=512)
    added, batches = [], []
    add, step = engine.add, engine.step

    def recording_add(request, arrival_time):
        added.append(request)
        add(request, arrival_time=arrival_time)

    def recording_step():
        batches.append(engine.engine.num_running)
        return step()

    engine.add, engine.step = recording_add, recording_step
    try:
        warm_up(engine, BenchRequest("r0", list(range(3, 203)), 6), config)
        assert [(len(r.prompt_token_ids), r.output_len) for r in added] == [(96, 4), (96, 8)]
        assert not engine.has_unfinished()
        assert 2 in batches and batches[-1] == 1
    finally:
        engine.close()


def test_metrics_port_serves_every_modes_metrics_while_it_runs():
    """`--metrics-port`: each mode's engine exports under its own labels."""
    port = _free_port()
    argv = [
        "bench", "--model", "spin-tiny", "--device", "cpu", "--modes", "dense,spin",
        "--num-prompts", "2", "--input-len", "100", "--output-len", "4", "--no-warmup",
        "--no-progress", "--metrics-port", str(port),
    ]  # fmt: skip
    before = {mode: _generated(mode) for mode in ("dense", "spin")}
    assert main(argv) == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for mode, algorithm in (("dense", "dense"), ("spin", "quest")):
        line = (
            f'spin_ray_generation_tokens_total{{algorithm="{algorithm}",model="spin-tiny",'
            f'tiers="{mode}"}}'
        )
        assert f"{line} {before[mode] + 2 * 4}" in text


def _generated(mode: str) -> float:
    labels = {"model": "spin-tiny", "algorithm": "quest" if mode == "spin" else "dense"}
    name = "spin_ray_generation_tokens_total"
    return prometheus_client.REGISTRY.get_sample_value(name, {**labels, "tiers": mode}) or 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
