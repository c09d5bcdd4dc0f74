"""`spin-ray bench`: run several modes on the same workload and compare them.

    spin-ray bench --model llama-3.1-8b --device cuda \\
        --modes dense,dense-offload,sparse-naive,spin --sparse quest \\
        --workload longbench-v2 --scale 0.25 --num-prompts 32 \\
        --request-rate 1,2,inf --output results.json --plot-dir plots/
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

from spin_ray.commands.engine_args import (
    add_engine_args,
    add_sparse_args,
    engine_kwargs,
    sparse_kwargs,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark modes (dense, dense-offload, sparse-naive, spin, vllm) on one workload",
        description="Run every mode on the same seeded workload, one engine at a time, and "
        "report throughput, TTFT/TPOT percentiles, batch sizes, HBM hit rate, PCIe traffic and "
        "time shares as a Markdown table, a JSON file and plots. The sparse flags set the spin "
        "mode; dense-offload and sparse-naive are presets made from them "
        "(spin_ray/sparse/presets.py); --gpu-cache-tokens is every mode's HBM KV capacity.",
    )
    add_engine_args(parser)
    add_sparse_args(parser)
    parser.add_argument(
        "--modes",
        default="dense",
        help="comma-separated presets (dense, dense-offload, sparse-naive, spin) and vllm "
        "(default dense)",
    )
    parser.add_argument("--workload", default=None, help="longbench-v2 or longgenbench")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="with --workload: multiply its input and output lengths (e.g. 0.25)",
    )
    parser.add_argument("--num-prompts", type=int, default=8, help="requests in the workload")
    parser.add_argument(
        "--input-len", type=int, default=None, help="fixed prompt length (default 1024)"
    )
    parser.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="fixed output length (default 128); with --workload, replaces sampled outputs",
    )
    parser.add_argument(
        "--request-rate",
        default="inf",
        help="requests/s of Poisson arrivals, comma-separated for a sweep; inf = all at once",
    )
    parser.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Gamma shape of the inter-arrival times: 1 Poisson, < 1 burstier, > 1 more even",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="requests in flight at most; a due request waits for one to finish (default: no cap)",
    )
    parser.add_argument("--output", default=None, help="write the JSON results here")
    parser.add_argument("--plot-dir", default=None, help="write PNG plots here (needs 2+ rates)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds per mode and rate; past it, unfinished requests are aborted (truncated)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every mode at every rate (each reported; comparisons also as medians)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up requests")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def bench_config(args: argparse.Namespace):
    """The `BenchConfig` named by the command line; `ValueError` names a bad field."""
    from spin_ray.bench.config import BenchConfig
    from spin_ray.bench.workloads import WorkloadSpec
    from spin_ray.sparse import QuestConfig, SparseConfig

    name = args.workload or "fixed"
    workload = WorkloadSpec(
        name=name,
        num_prompts=args.num_prompts,
        input_len=args.input_len if args.workload else (args.input_len or 1024),
        output_len=args.output_len if args.workload else (args.output_len or 128),
        scale=args.scale,
        seed=0 if args.seed is None else args.seed,
    )
    engine = engine_kwargs(args)
    given = sparse_kwargs(args)
    sparse = SparseConfig(algorithm=given.pop("sparse", QuestConfig()), **given)
    config = BenchConfig(
        model=engine.pop("model"),
        workload=workload,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        request_rates=_parse_rates(args.request_rate),
        sparse=sparse,
        engine_options=engine,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        metrics_port=engine.pop("metrics_port"),
        time_limit=args.time_limit,
        repeats=args.repeats,
        warmup=not args.no_warmup,
        progress=not args.no_progress,
    )
    _check_before_running(config, args.plot_dir)
    return config


def _check_before_running(config, plot_dir: str | None) -> None:
    """What would otherwise fail only once engines are built, or after the whole run."""
    from spin_ray.engine.config import resolve_device, resolve_dtype
    from spin_ray.models.loader import model_arch

    model_arch(config.model)  # an unknown model or folder
    resolve_dtype(config.option("dtype"), resolve_device(config.option("device")))
    if plot_dir is not None:
        if len(config.request_rates) < 2:
            raise ValueError("plot_dir: plots are against request rate; give 2+ --request-rate")
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("plot_dir: plots need matplotlib (pip install 'spin-ray[bench]')")


def run(args: argparse.Namespace) -> int:
    from spin_ray.bench.report import (
        build_document,
        environment,
        markdown_report,
        progress_line,
        write_json,
        write_plots,
    )
    from spin_ray.bench.runner import run_benchmark
    from spin_ray.bench.summary import compare_modes, summarize
    from spin_ray.engine.config import resolve_device

    config = bench_config(args)
    env = environment(resolve_device(config.option("device")))
    log = lambda message: print(message, file=sys.stderr, flush=True)
    results: list[dict] = []

    def on_record(record) -> None:  # a line and the JSON file as each result comes
        results.append(summarize(record))
        log(progress_line(results[-1]))
        if args.output:
            write_json(
                build_document(config, results, compare_modes(results), {}, {}, env), args.output
            )

    sparse_modes = [m for m in config.modes if m in ("sparse-naive", "spin")]
    if sparse_modes:
        log(
            f"{', '.join(sparse_modes)}: sparse algorithm {config.sparse.algorithm.name} (--sparse)"
        )
    run = run_benchmark(config, log=log, on_record=on_record)
    comparisons = compare_modes(results)
    not_run = {**run.skipped, **{mode: f"failed: {why}" for mode, why in run.failed.items()}}
    print(markdown_report(results, comparisons, not_run))
    if args.output:
        document = build_document(config, results, comparisons, run.skipped, run.failed, env)
        write_json(document, args.output)
        log(f"results written to {args.output}")
    if args.plot_dir:
        spec = config.workload
        workload = spec.name if spec.name != "fixed" else f"{spec.input_len}/{spec.output_len} tok"
        algorithm = config.sparse.algorithm.name
        title = f"{config.model}, {workload}, {env['gpu'] or 'CPU'}, sparse {algorithm}"
        written = write_plots(results, args.plot_dir, title)
        log(f"plots: {', '.join(map(str, written))}" if written else "plots need 2+ rates")
    return 1 if run.failed else 0


def _parse_rates(text: str) -> tuple[float, ...]:
    rates = []
    for part in text.split(","):
        try:
            rates.append(math.inf if part.strip() == "inf" else float(part))
        except ValueError:
            raise ValueError(f"request_rate: {part!r} is not a number or inf") from None
    return tuple(rates)
