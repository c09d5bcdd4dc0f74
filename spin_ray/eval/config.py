"""What one `spin-ray eval` run measures."""

from __future__ import annotations

from dataclasses import dataclass

from spin_ray.eval.tasks import TASKS
from spin_ray.sparse.algorithm_config import ALGORITHMS
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.presets import PRESETS


@dataclass(frozen=True)
class Setting:
    """One row of the results: the dense engine, or one algorithm, preset and token budget."""

    algorithm: str
    """"dense" (the reference: the plain dense engine) or a sparse algorithm."""
    mode: str = "dense"
    """A preset (spin_ray/sparse/presets.py): "dense" for the reference, else "spin",
    "sparse-naive" or "dense-offload"."""
    token_budget: int | float | None = None
    """`SparseConfig.token_budget` (tokens, or a fraction of the context); None for dense."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS + ("dense",):
            raise ValueError(f"algorithms: unknown algorithm {self.algorithm!r}")
        if self.mode not in PRESETS:
            raise ValueError(f"modes: unknown mode {self.mode!r}")
        if (self.mode == "dense") != (self.token_budget is None):
            raise ValueError("token_budget: set it for sparse settings only")

    @property
    def is_reference(self) -> bool:
        return self.mode == "dense"

    @property
    def label(self) -> str:
        if self.is_reference:
            return "dense"
        return f"{self.algorithm} ({self.mode}, {self.token_budget})"


@dataclass(frozen=True)
class EvalConfig:
    """A sweep: every setting on the same cases, at every length."""

    model: str = "smollm2-135m"
    """Checkpoint (any `--model` value)."""
    device: str = "cpu"
    """Resolved device."""
    dtype: str = "auto"
    """Weights and KV dtype (`--dtype`)."""
    lengths: tuple[int, ...] = (4096,)
    """Prompt lengths in tokens."""
    tasks: tuple[str, ...] = TASKS
    """Synthetic tasks (`spin_ray.eval.tasks.TASKS`)."""
    samples: int = 1
    """Cases of each task at each length (the pass key's depths spread over them)."""
    settings: tuple[Setting, ...] = (Setting("dense"),)
    """Rows, the dense reference first."""
    sparse: SparseConfig = SparseConfig()
    """What every sparse row starts from (sink and local windows, dense layers, buffer, ...);
    each row sets its own algorithm, token budget and preset."""
    scored_tokens: int = 32
    """Teacher-forced tokens of the log-likelihood case at each length (0: none)."""
    seed: int = 0
    """Seed of the cases."""
    seer_gate_path: str | None = None
    """The gate of every seer setting (`spin-ray train-gate` writes one); None: the untrained
    gate."""

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 256 for n in self.lengths):
            raise ValueError(f"lengths: need lengths of at least 256 tokens, got {self.lengths}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; use some of {TASKS}")
        if self.samples < 1:
            raise ValueError(f"samples: must be >= 1, got {self.samples}")
        if not self.settings or not self.settings[0].is_reference:
            raise ValueError("settings: the dense reference must come first")
        if self.scored_tokens < 0:
            raise ValueError(f"scored_tokens: must be >= 0, got {self.scored_tokens}")
        if not self.tasks and not self.scored_tokens:
            raise ValueError("tasks: nothing to measure (no tasks and no scored tokens)")
