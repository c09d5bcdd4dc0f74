"""Each sparse attention algorithm's own frozen settings, checked where they are made.

`SparseConfig.algorithm` holds one of these; the runtime never reads an algorithm's fields
(the algorithm class named by `name` does, spin_ray/sparse/algorithms/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class AlgorithmConfig:
    """What every algorithm's settings answer."""

    name: ClassVar[str]
    attends_all: ClassVar[bool] = False
    """Every page is attended, so there is nothing to select."""

    def check_page_size(self, page_size: int) -> None:
        """Raise `ValueError` naming the field when a partition size does not fit the pages."""


@dataclass(frozen=True)
class FullConfig(AlgorithmConfig):
    """Every page attended, nothing indexed or scored: the `dense-offload` baseline's
    algorithm (dense attention over KV kept in host memory)."""

    name: ClassVar[str] = "full"
    attends_all: ClassVar[bool] = True


@dataclass(frozen=True)
class QuestConfig(AlgorithmConfig):
    """Quest: per-page min/max key summaries bound each page's attention score."""

    name: ClassVar[str] = "quest"


@dataclass(frozen=True)
class ShadowKVConfig(AlgorithmConfig):
    """ShadowKV: the mean key of each chunk (a landmark) scores its page."""

    name: ClassVar[str] = "shadowkv"
    chunk_size: int = 8
    """Tokens per landmark chunk (a power of two dividing the page size)."""

    def __post_init__(self) -> None:
        power_of_two("chunk_size", self.chunk_size)

    def check_page_size(self, page_size: int) -> None:
        if page_size % self.chunk_size:
            raise ValueError(f"chunk_size: {self.chunk_size} must divide the page size {page_size}")


@dataclass(frozen=True)
class RetroInferConfig(AlgorithmConfig):
    """RetroInfer: k-means clusters of keys within segments; the best clusters are retrieved,
    the next ones estimated from their centroid and value sum."""

    name: ClassVar[str] = "retroinfer"
    segment_tokens: int = 8192
    """k-means runs within segments of this many tokens (a multiple of the page size)."""
    cluster_tokens: int = 16
    """Average tokens per cluster (clusters = tokens / this)."""
    kmeans_iters: int = 10
    """k-means iterations."""
    estimation_fraction: float = 0.232
    """Share of clusters, ranked after the retrieved ones, whose attention is estimated from
    centroid and value sum (0 turns the estimation zone off)."""

    def __post_init__(self) -> None:
        at_least("segment_tokens", self.segment_tokens, 1)
        at_least("cluster_tokens", self.cluster_tokens, 1)
        at_least("kmeans_iters", self.kmeans_iters, 0)
        if not 0.0 <= self.estimation_fraction < 1.0:
            raise ValueError(
                f"estimation_fraction: must be in [0, 1), got {self.estimation_fraction}"
            )

    def check_page_size(self, page_size: int) -> None:
        if self.segment_tokens % page_size:
            raise ValueError(
                f"segment_tokens: {self.segment_tokens} must be a multiple of the page size "
                f"{page_size}"
            )


@dataclass(frozen=True)
class SeerConfig(AlgorithmConfig):
    """SeerAttention-R: a learned gate scores blocks of pages from pooled queries and keys."""

    name: ClassVar[str] = "seer"
    block_size: int = 64
    """Tokens per gated block (a power of two, a multiple of the page size)."""
    gate_path: str | None = None
    """Safetensors/torch file of gate weights `layers.{i}.q_gate` [Hkv, D, Dg] and
    `layers.{i}.k_gate` [Hkv, 3D, Dg]; None: the deterministic test gate (see seer.py)."""

    def __post_init__(self) -> None:
        power_of_two("block_size", self.block_size)

    def check_page_size(self, page_size: int) -> None:
        if self.block_size % page_size:
            raise ValueError(
                f"block_size: {self.block_size} must be a multiple of the page size {page_size}"
            )


ALGORITHM_CONFIGS: dict[str, type[AlgorithmConfig]] = {
    cls.name: cls for cls in (FullConfig, QuestConfig, ShadowKVConfig, RetroInferConfig, SeerConfig)
}
"""Every algorithm's settings by name."""

ALGORITHMS = tuple(ALGORITHM_CONFIGS)
"""Every algorithm's name."""


def algorithm_config(value: str | AlgorithmConfig) -> AlgorithmConfig:
    """An algorithm's settings: `value` itself, or the defaults of the algorithm it names."""
    if isinstance(value, AlgorithmConfig):
        return value
    if value not in ALGORITHM_CONFIGS:
        raise ValueError(f"algorithm: unknown algorithm {value!r}; use one of {ALGORITHMS}")
    return ALGORITHM_CONFIGS[value]()


def at_least(name: str, value: object, low: int) -> None:
    """Raise `ValueError` naming the field unless `value` is an int >= `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")


def power_of_two(name: str, value: int) -> None:
    """Raise `ValueError` naming the field unless `value` is a power of two >= 1."""
    at_least(name, value, 1)
    if value & (value - 1):
        raise ValueError(f"{name}: must be a power of two >= 1, got {value}")
