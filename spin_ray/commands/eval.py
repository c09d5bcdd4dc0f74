"""`spin-ray eval`: accuracy of sparse attention against dense on synthetic long-context tasks
and teacher-forced log-likelihood (spin_ray/eval/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from spin_ray.commands.engine_args import add_dataclass_flags, dataclass_kwargs
from spin_ray.eval.tasks import TASKS
from spin_ray.sparse.algorithm_config import ALGORITHMS
from spin_ray.sparse.config import SparseConfig

ROW_FIELDS = ("algorithm", "tiers", "token_budget", "gpu_cache_tokens", "cpu_cache_tokens",
              "host_memory_fraction")  # fmt: skip
"""SparseConfig fields each row (or the sweep's sizing) sets itself."""

DEFAULT_ALGORITHMS = ("quest", "shadowkv", "retroinfer", "seer")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy of sparse attention against dense",
        description="Seeded synthetic long-context tasks (RULER-style: pass key, multi-key, "
        "multi-value, variable tracking, aggregation) and the teacher-forced log-likelihood of "
        "long natural text, for the dense engine and every algorithm, mode and token budget "
        "asked for; prints a Markdown table, writes JSON and a plot.",
    )
    parser.add_argument("--model", default="smollm2-135m", help="any --model of generate "
                        "(default %(default)s)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), ...")
    parser.add_argument("--lengths", default="4096", help="prompt lengths in tokens, comma-"
                        "separated, up to the model's limit (default %(default)s)")  # fmt: skip
    parser.add_argument("--tasks", default=",".join(TASKS), help="default: all, %(default)s")
    parser.add_argument("--samples", type=int, default=1,
                        help="cases per task and length (default %(default)s)")  # fmt: skip
    parser.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS),
                        help=f"of {', '.join(ALGORITHMS)} (default %(default)s)")  # fmt: skip
    parser.add_argument("--modes", default="spin", help="spin, sparse-naive (same selection, "
                        "no buffer), dense-offload (default %(default)s)")  # fmt: skip
    parser.add_argument("--budgets", default="512,1024,2048", help="token budgets: tokens "
                        "(int) or fractions of the context (0.25), sink and local included "
                        "(default %(default)s)")  # fmt: skip
    group = parser.add_argument_group("what every sparse row starts from (SparseConfig)")
    add_dataclass_flags(group, SparseConfig, skip=ROW_FIELDS)
    parser.add_argument("--scored-tokens", type=int, default=32, help="teacher-forced tokens of "
                        "the log-likelihood case; 0: none (default %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seer-gate-path", default=None, help="the gate of the seer settings "
                        "(spin-ray train-gate writes one; default: untrained)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of accuracy vs budget")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spin_ray.engine.config import resolve_device
    from spin_ray.eval.config import EvalConfig, Setting
    from spin_ray.eval.report import markdown, plot, write_json
    from spin_ray.eval.runner import run_eval

    settings = [Setting("dense")] + [
        Setting(algorithm, mode, budget)
        for algorithm in _names(args.algorithms)
        for mode in _names(args.modes)
        for budget in _budgets(args.budgets)
    ]
    config = EvalConfig(
        model=args.model,
        device=resolve_device(args.device),
        dtype=args.dtype,
        lengths=tuple(_ints("lengths", args.lengths)),
        tasks=tuple(_names(args.tasks)),
        samples=args.samples,
        settings=tuple(settings),
        sparse=SparseConfig(**dataclass_kwargs(args, SparseConfig)),
        scored_tokens=args.scored_tokens,
        seed=args.seed,
        seer_gate_path=args.seer_gate_path,
    )
    result = run_eval(config)
    print(markdown(result))
    print(f"{result.seconds:.0f} s on {config.device}")
    if args.output is not None:
        write_json(result, args.output)
    if args.plot is not None:
        plot(result, args.plot)
    return 0


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(field: str, text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise ValueError(f"{field}: expected comma-separated integers, got {text!r}") from None


def _budgets(text: str) -> list[int | float]:
    budgets = []
    for part in _names(text):
        try:
            budgets.append(float(part) if "." in part else int(part))
        except ValueError:
            raise ValueError(f"budgets: {part!r} is neither a token count nor a fraction") from None
    return budgets
