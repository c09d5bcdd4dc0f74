"""What a benchmark leaves behind: the JSON document, a Markdown table, and PNG plots."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from spin_ray.bench.config import BenchConfig
from spin_ray.bench.summary import UNITS


def environment(device: str) -> dict:
    """Where the numbers come from: GPU, library versions, commit, date."""
    cuda = device != "cpu" and torch.cuda.is_available()
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
    }
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        env["vllm"] = None
    return env


def build_document(
    config: BenchConfig,
    results: list[dict],
    comparisons: list[dict],
    skipped: dict[str, str],
    failed: dict[str, str],
    env: dict,
) -> dict:
    return {
        "command": " ".join(sys.argv),
        "config": _config_document(config),
        "environment": env,
        "units": UNITS,
        "results": _jsonable(results),
        "comparisons": _jsonable(comparisons),
        "skipped_modes": skipped,
        "failed_modes": failed,
    }


def write_json(document: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


COLUMNS = (
    ("mode", "mode", "{}"),
    ("rate", "request_rate", "{}"),
    ("done", "completed", "{}"),
    ("req/s", "request_throughput", "{:.3f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("2nd half tok/s", "second_half_output_throughput", "{:.1f}"),
    ("TTFT p50 ms", "ttft_p50", "{:.1f}"),
    ("TTFT p99 ms", "ttft_p99", "{:.1f}"),
    ("TPOT p50 ms", "tpot_p50", "{:.2f}"),
    ("TPOT p99 ms", "tpot_p99", "{:.2f}"),
    ("ITL p99 ms", "itl_p99", "{:.2f}"),
    ("batch mean", "mean_batch", "{:.1f}"),
    ("batch max", "max_batch", "{}"),
    ("preempted", "preemptions", "{}"),
    ("decode-only s", "decode_only_s", "{:.1f}"),
    ("other steps s", "other_steps_s", "{:.1f}"),
    ("prefill tok/s", "prefill_tok_per_s", "{:.0f}"),
    ("graphs", "graph_captures", "{}"),
    ("capture s", "graph_capture_s", "{:.1f}"),
    ("HBM hit", "hbm_hit_rate", "{:.1%}"),
    ("H2D GB", "h2d_bytes", "{:.2f}", 1e-9),
    ("H2D GB/s", "h2d_gbps", "{:.2f}"),
    ("D2H GB/s", "d2h_gbps", "{:.2f}"),
    ("select", "select_share", "{:.0%}"),
    ("fetch", "fetch_share", "{:.0%}"),
    ("index", "index_share", "{:.0%}"),
    ("attn", "attention_share", "{:.0%}"),
    ("rest", "rest_share", "{:.0%}"),
)

RUN_COLUMN = ("run", "repeat", "{}")
"""Shown when a benchmark repeated its runs (`--repeats`)."""

COMPARISON_COLUMNS = (
    ("rate", "request_rate", "{}"),
    ("spin/dense throughput", "throughput_vs_dense", "{:.2f}x"),
    ("2nd half", "second_half_throughput_vs_dense", "{:.2f}x"),
    ("dense/spin TTFT p50", "ttft_p50_speedup_vs_dense", "{:.2f}x"),
    ("spin/dense TPOT p50", "tpot_p50_vs_dense", "{:.2f}x"),
    ("spin/dense mean batch", "mean_batch_vs_dense", "{:.2f}x"),
    ("same batch", "same_batch_size", "{}"),
    ("spin/dense decode step at same batch", "decode_step_vs_dense_same_batch", "{:.2f}x"),
    ("TPOT p50 below sparse-naive", "tpot_p50_reduction_vs_sparse_naive", "{:.0%}"),
    ("spin/vllm throughput", "throughput_vs_vllm", "{:.2f}x"),
    ("dense/vllm throughput", "dense_throughput_vs_vllm", "{:.2f}x"),
)


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    """A Markdown table of `rows` (columns: title, key, format[, scale]); missing figures print
    as `-`."""
    header = "| " + " | ".join(column[0] for column in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for _, key, fmt, *scale in columns:
            value = row.get(key)
            if value is not None and scale:
                value *= scale[0]
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress_line(row: dict) -> str:
    """One line for a finished run while the others go on (the full table comes at the end)."""
    ttft = "-" if row["ttft_p50"] is None else f"{row['ttft_p50']:.0f} ms"
    return (
        f"done: {row['mode']} at rate {row['request_rate']}, run {row['repeat']}: "
        f"{row['completed']}/{row['num_requests']} requests, "
        f"{row['output_throughput']:.1f} output tok/s, TTFT p50 {ttft}"
    )


def markdown_report(results: list[dict], comparisons: list[dict], skipped: dict[str, str]) -> str:
    repeated = any(r.get("repeat", 1) > 1 for r in results)
    columns, comparison_columns = COLUMNS, COMPARISON_COLUMNS
    if repeated:  # a run column after the rate
        columns = (*COLUMNS[:2], RUN_COLUMN, *COLUMNS[2:])
        comparison_columns = (COMPARISON_COLUMNS[0], RUN_COLUMN, *COMPARISON_COLUMNS[1:])
    parts = [markdown_table(results, columns)]
    untimed = [r["mode"] for r in results if r["lookups"] is not None and r["rest_share"] is None]
    if untimed:  # the engine keeps cache statistics but could not time its phases
        parts.append(
            f"{', '.join(dict.fromkeys(untimed))}: no time shares; they need --enforce-eager "
            "(CUDA graphs replay the decode steps untimed)"
        )
    if comparisons:
        parts.append(markdown_table(comparisons, comparison_columns))
    parts += [
        f"{r['mode']} at rate {r['request_rate']}"
        + (f", run {r['repeat']}" if repeated else "")
        + ": stopped by the time limit after "
        f"{r['duration']:g} s, {r['completed']}/{r['num_requests']} requests finished"
        + (f" ({r['arrived']} arrived by then)" if r["arrived"] < r["num_requests"] else "")
        + (
            f"; {r['ttft_censored']} had no first token yet and count in its TTFT as waiting "
            "until the limit (a lower bound)"
            if r["ttft_censored"]
            else ""
        )
        for r in results
        if r["truncated"]
    ]
    parts += [f"{mode}: not run ({why})" for mode, why in skipped.items()]
    return "\n\n".join(parts)


def write_plots(results: list[dict], plot_dir: str | Path, title: str = "") -> list[Path]:
    """Throughput and latency (p50 solid, p99 dashed) against request rate, one colour per mode
    (inf plotted last, as "offline"; repeated runs as their median), under `title`. Needs at
    least two rates; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({_rate_value(r["request_rate"]) for r in results})
    if len(rates) < 2:
        return []
    positions = {rate: i for i, rate in enumerate(rates)}
    labels = ["offline" if math.isinf(rate) else f"{rate:g}" for rate in rates]
    modes = list(dict.fromkeys(r["mode"] for r in results))
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    panels = {  # file -> panels of (y label, the keys plotted, each with its line style)
        "throughput.png": [("output tokens/s", [("output_throughput", "-")])],
        "latency.png": [
            ("TTFT (ms)", [("ttft_p50", "-"), ("ttft_p99", "--")]),
            ("TPOT (ms)", [("tpot_p50", "-"), ("tpot_p99", "--")]),
        ],
    }
    colours = {mode: f"C{i}" for i, mode in enumerate(modes)}
    written = []
    for filename, figures in panels.items():
        fig, axes = plt.subplots(1, len(figures), figsize=(6 * len(figures), 4), squeeze=False)
        for ax, (ylabel, keys) in zip(axes[0], figures, strict=True):
            for mode, (key, style) in itertools.product(modes, keys):
                runs: dict[int, list[float]] = {}  # rate position -> the runs' values
                for r in results:
                    if r["mode"] == mode and r[key] is not None:
                        x = positions[_rate_value(r["request_rate"])]
                        runs.setdefault(x, []).append(r[key])
                points = sorted((x, float(np.median(values))) for x, values in runs.items())
                if points:
                    label = mode if len(keys) == 1 else f"{mode} {key.rsplit('_', 1)[1]}"
                    ax.plot(*zip(*points, strict=True), style, color=colours[mode], marker="o",
                            label=label)  # fmt: skip
            ax.set_xticks(range(len(rates)), labels)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(plot_dir / filename, dpi=120)
        plt.close(fig)
        written.append(plot_dir / filename)
    return written


def _rate_value(rate: float | str) -> float:
    return math.inf if rate == "inf" else float(rate)


def _config_document(config: BenchConfig) -> dict:
    """The config's fields; the spin settings' algorithm with its name."""
    document = _jsonable(dataclasses.asdict(config))
    algorithm = config.sparse.algorithm
    document["sparse"]["algorithm"] = {"name": algorithm.name, **dataclasses.asdict(algorithm)}
    return document


def _jsonable(value):
    """Infinite floats become "inf" (JSON has no infinity); containers recurse."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
