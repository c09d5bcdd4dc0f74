"""The frozen configuration of the sparse, hierarchical KV cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from spin_ray.sparse.algorithm_config import (
    ALGORITHM_CONFIGS,
    AlgorithmConfig,
    QuestConfig,
    algorithm_config,
    at_least,
    power_of_two,
)


class TierPolicy(StrEnum):
    """How the HBM tier holds the pages a decode step reads from the CPU tier."""

    SPIN = "spin"
    """A per-request HBM buffer kept with a bucketed LRU: pages stay across steps and a step
    fetches only what its buffer lacks."""
    NAIVE = "sparse-naive"
    """No buffer: every selected page is fetched every step (SPIN's ablation)."""


@dataclass(frozen=True)
class SparseConfig:
    """Sparse attention over a two-tier (HBM + host memory) KV cache. Token counts are per
    sequence; the page size is `CacheConfig.page_size`. An engine without one is dense: all KV
    in HBM."""

    algorithm: AlgorithmConfig = QuestConfig()
    """Which pages each decode step attends to: an algorithm's settings
    (spin_ray/sparse/algorithm_config.py), or its name for its defaults."""
    tiers: TierPolicy = TierPolicy.SPIN
    """How HBM holds the pages steps read: "spin" (a per-request buffer with LRU reuse) or
    "sparse-naive" (every selected page fetched every step)."""
    token_budget: int | float = 2048
    """Tokens each (layer, KV head) attends per decode step, sink and local window included: an
    int is a token count, a float in (0, 1] a fraction of the context."""
    sink_tokens: int = 64
    """First tokens of every sequence always attended."""
    local_tokens: int = 256
    """Last tokens of every sequence always attended (tokens the index does not yet cover are
    attended too)."""
    dense_layers: int = 2
    """The first this many layers attend densely with their KV kept in HBM."""
    buffer_ratio: float = 15.0
    """HBM pages a request keeps for reuse, as a multiple of its mandatory pages (this step's
    selection + sink + local), when HBM is free; under pressure buffers shrink toward
    `min_buffer_ratio` (bench/RESULTS.md measures the hit rate each ratio buys)."""
    min_buffer_ratio: float = 4.0
    """Buffer pages a request keeps under memory pressure (multiple of mandatory, capped at
    `buffer_ratio`); admission needs mandatory × (1 + that) free HBM pages, so a larger floor
    runs fewer requests, each with more reuse."""
    lookahead: bool = False
    """spin: while a decode step computes layer l, select layer l + 1's pages with a query
    predicted from layer l's input (InfiniGen's cross-layer prediction), place them in the HBM
    buffer and fetch the misses on a side stream, so their PCIe time overlaps layer l's
    compute; layer l + 1 then selects with its real query as always (the same pages are
    attended, so the same tokens) and fetches only what the prediction missed. Needs
    `min_buffer_ratio` >= 1 (room for both lists)."""
    lookahead_share: float = 1.0
    """The share of the top-k pages a lookahead selects and fetches early: its best-scored
    ones (rounded up; sink and local pages always); below 1 it spends less PCIe time on
    mispredictions."""
    gpu_cache_tokens: int | None = None
    """Tokens of HBM working-set slots (each holds one page of every offloaded layer and KV
    head); None: what GPU memory leaves after weights (CUDA), the CPU tier's size (CPU)."""
    cpu_cache_tokens: int | None = None
    """Tokens of host-memory KV (whole contexts); None: `host_memory_fraction` of available host
    memory (CUDA), `CacheConfig.num_pages` or `cpu_kv_tokens` (CPU)."""
    host_memory_fraction: float = 0.5
    """Share of available host memory the CPU tier takes when `cpu_cache_tokens` is None."""
    lru_buckets: int = 64
    """Recency buckets of the HBM buffer's LRU (pages older than this many steps tie)."""
    segment_pages: int = 16
    """Pages per second-level segment of the residency page tables (a power of two)."""
    fused_retrieve: bool | None = None
    """Retrieve (buffer lookup, LRU eviction, residency update) with the fused Triton kernels,
    two launches per layer (`kernels/spin_retrieve.py`), instead of their torch reference;
    rows too wide for one program take the reference either way. None: the kernels on CUDA,
    the reference on the CPU. True on the CPU runs the kernels in Triton's interpreter
    (`TRITON_INTERPRET=1`, as the tests do); False takes the reference on CUDA too."""
    check_invariants: bool = False
    """Check on every decode layer what the cache manager guarantees and the decode path
    therefore does not check: a request holds at least its mandatory slots, and the step
    reserved enough residency segments. Each check synchronises with the device, and the
    decode path is then not captured in CUDA graphs: for tests."""

    def __post_init__(self) -> None:
        # names given for the algorithm and the tier policy become their values
        object.__setattr__(self, "algorithm", algorithm_config(self.algorithm))
        if self.tiers not in set(TierPolicy):
            raise ValueError(
                f"tiers: unknown tier policy {self.tiers!r}; use one of {[*map(str, TierPolicy)]}"
            )
        object.__setattr__(self, "tiers", TierPolicy(self.tiers))
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"token_budget: expected an int or a float, got {budget!r}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"token_budget: must be >= 1 token, got {budget}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"token_budget: a fraction must be in (0, 1], got {budget}")
        at_least("sink_tokens", self.sink_tokens, 0)
        at_least("local_tokens", self.local_tokens, 1)
        at_least("dense_layers", self.dense_layers, 0)
        if self.buffer_ratio < 0:
            raise ValueError(f"buffer_ratio: must be >= 0, got {self.buffer_ratio}")
        if self.min_buffer_ratio < 0:
            raise ValueError(f"min_buffer_ratio: must be >= 0, got {self.min_buffer_ratio}")
        if self.lookahead and not self.retains:
            raise ValueError(f"lookahead: needs tiers 'spin' (an HBM buffer), got {self.tiers!s}")
        if not 0.0 < self.lookahead_share <= 1.0:
            raise ValueError(f"lookahead_share: must be in (0, 1], got {self.lookahead_share}")
        if self.lookahead_share != 1.0 and not self.lookahead:
            raise ValueError("lookahead_share: needs lookahead (--lookahead)")
        if self.lookahead and min(self.min_buffer_ratio, self.buffer_ratio) < 1:
            raise ValueError(
                "lookahead: needs min_buffer_ratio and buffer_ratio >= 1 (a request's buffer "
                "holds a predicted and a real selection at once), got "
                f"{self.min_buffer_ratio} and {self.buffer_ratio}"
            )
        for name in ("gpu_cache_tokens", "cpu_cache_tokens"):
            value = getattr(self, name)
            if value is not None:
                at_least(name, value, 1)
        if not 0.0 < self.host_memory_fraction <= 0.95:
            raise ValueError(
                f"host_memory_fraction: must be in (0, 0.95], got {self.host_memory_fraction}"
            )
        if not 2 <= self.lru_buckets <= 250:
            raise ValueError(f"lru_buckets: must be in [2, 250], got {self.lru_buckets}")
        power_of_two("segment_pages", self.segment_pages)

    @property
    def retains(self) -> bool:
        """Fetched pages stay in HBM across steps (the "spin" tier policy's buffer)."""
        return self.tiers is TierPolicy.SPIN

    def check_page_size(self, page_size: int) -> None:
        """Raise `ValueError` naming the field when a partition size does not fit the pages."""
        self.algorithm.check_page_size(page_size)


def sparse_config(value: str | AlgorithmConfig | SparseConfig | Mapping[str, Any]) -> SparseConfig:
    """A `SparseConfig` from what `LLM(sparse=...)` and deploy/app.yaml accept: a config, an
    algorithm's settings or name (the other fields' defaults), or a mapping of fields whose
    `algorithm` may itself be a mapping with the algorithm's `name` and settings."""
    if isinstance(value, SparseConfig):
        return value
    if isinstance(value, str | AlgorithmConfig):
        return SparseConfig(algorithm=value)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"sparse: expected an algorithm name, settings or a mapping, got {value!r}"
        )
    known = {f.name for f in fields(SparseConfig)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"sparse: unknown fields {sorted(unknown)}; known: {sorted(known)}")
    given = dict(value)
    if isinstance(given.get("algorithm"), Mapping):
        given["algorithm"] = _algorithm_from_mapping(given["algorithm"])
    return SparseConfig(**given)


def _algorithm_from_mapping(value: Mapping[str, Any]) -> AlgorithmConfig:
    settings = dict(value)
    name = settings.pop("name", None)
    if name not in ALGORITHM_CONFIGS:
        raise ValueError(
            f"sparse.algorithm: 'name' must be one of {tuple(ALGORITHM_CONFIGS)}, got {name!r}"
        )
    cls = ALGORITHM_CONFIGS[name]
    known = {f.name for f in fields(cls)}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(
            f"sparse.algorithm: {name} has no fields {sorted(unknown)}; known: {sorted(known)}"
        )
    return cls(**settings)
