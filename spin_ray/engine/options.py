"""The engine's settings as flat options: every field of `EngineConfig`, `CacheConfig`,
`SchedulerConfig` and `SparseConfig` by its own name. `LLM(**options)`, the CLI's flags
(spin_ray/commands/engine_args.py), the benchmark and deploy/app.yaml's `engine_args` all
forward them here, so a new field is written once, in its dataclass, and its docstring is its
help text everywhere."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from spin_ray.cache.config import CacheConfig
from spin_ray.engine.config import EngineConfig, SchedulerConfig, resolve_device, resolve_dtype
from spin_ray.sparse.algorithm_config import AlgorithmConfig
from spin_ray.sparse.config import SparseConfig, sparse_config

SECTIONS: tuple[type, ...] = (EngineConfig, CacheConfig, SchedulerConfig, SparseConfig)
"""The dataclasses whose fields are options, in the order help lists them."""
_STRUCTURE = {"model", "cache", "scheduler", "sparse", "algorithm"}
"""Fields that are not options: the model is its own argument, the sections are built here,
and the sparse algorithm is what `sparse=` names."""
_OPTION_DEFAULTS = {"device": "auto", "dtype": "auto"}
"""Options whose value is resolved before it reaches its field."""


@dataclass(frozen=True)
class Option:
    """One option: its field, the dataclass that owns it, its type and its documentation."""

    name: str
    owner: type
    type: Any
    default: Any
    doc: str


@functools.cache
def options() -> dict[str, Option]:
    """Every engine option by name."""
    found = {}
    for owner in SECTIONS:
        for option in dataclass_options(owner):
            if option.name not in _STRUCTURE:
                found[option.name] = option
    return found


def dataclass_options(cls: type) -> list[Option]:
    """A dataclass's fields as options (the sparse algorithms' settings use it too)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    result = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        default = _OPTION_DEFAULTS.get(f.name, default) if cls is EngineConfig else default
        result.append(Option(f.name, cls, hints[f.name], default, docs.get(f.name, "")))
    return result


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and its bases; class variables are no
    fields), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    fields = {f.name for f in dataclasses.fields(cls)}
    return {name: doc for name, doc in docs.items() if name in fields}


def engine_config(
    model: str,
    sparse: str | AlgorithmConfig | SparseConfig | Mapping[str, Any] | None = None,
    **given: Any,
) -> EngineConfig:
    """The `EngineConfig` that `model`, `sparse` and the options describe. `sparse` (an
    algorithm's name or settings, a `SparseConfig`, or a mapping of its fields) makes the KV
    cache tiered; so does any `SparseConfig` option (with quest's settings); without either
    the engine is dense, all KV in HBM. An option given as None takes its field's default."""
    given = {name: value for name, value in given.items() if value is not None}
    known = options()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown engine option; known: {sorted(known)}")
    by_owner: dict[type, dict[str, Any]] = {owner: {} for owner in SECTIONS}
    for name, value in given.items():
        by_owner[known[name].owner][name] = value
    sparse_fields = by_owner[SparseConfig]
    tiered = None if sparse is None else sparse_config(sparse)
    if sparse_fields:
        tiered = replace(tiered or SparseConfig(), **sparse_fields)
    top = by_owner[EngineConfig]
    device = resolve_device(top.pop("device", "auto"))
    dtype = resolve_dtype(top.pop("dtype", "auto"), device)
    return EngineConfig(
        model=model,
        device=device,
        dtype=dtype,
        cache=CacheConfig(**by_owner[CacheConfig]),
        scheduler=SchedulerConfig(**by_owner[SchedulerConfig]),
        sparse=tiered,
        **top,
    )


def options_doc() -> str:
    """Every option with its default and documentation, for `LLM`'s docstring."""
    lines = []
    for owner in SECTIONS:
        lines.append(f"\n{owner.__name__} options:")
        for option in options().values():
            if option.owner is owner:
                lines.append(f"    {option.name} (default {option.default!r}): {option.doc}")
    return "\n".join(lines)
