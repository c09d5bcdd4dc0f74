"""`spin-ray train-gate`: distil a Seer gate for a checkpoint and write it beside the model.

spin-ray train-gate --model smollm2-135m --block-size 64
spin-ray generate --model smollm2-135m --sparse seer --seer-gate-path <the path it printed>
"""

from __future__ import annotations

import argparse

from spin_ray.commands.engine_args import add_dataclass_flags, dataclass_kwargs
from spin_ray.training.seer_gate import GateTrainingConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-gate",
        help="distil a Seer gate for a checkpoint from its own attention",
        description="Fit the Seer algorithm's block gate (spin_ray/sparse/algorithms/seer.py) to "
        "the checkpoint's own block attention mass over offline text (the model is not "
        "changed), write it as safetensors, and report its recall of the true top blocks on "
        "held-out positions against the untrained gate's.",
    )
    add_dataclass_flags(parser.add_argument_group("training"), GateTrainingConfig)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spin_ray.training.seer_gate import train_seer_gate

    config = GateTrainingConfig(**dataclass_kwargs(args, GateTrainingConfig))
    report = train_seer_gate(config, progress=not args.no_progress)
    print(
        f"{report.layers} layers, block {config.block_size}: held-out recall of the top "
        f"{config.top_blocks} blocks {report.recall_trained:.1%} (untrained gate "
        f"{report.recall_untrained:.1%}), {report.seconds:.0f} s"
    )
    print(
        f"gate written to {report.path}; use it with --sparse seer --seer-gate-path {report.path}"
    )
    return 0
