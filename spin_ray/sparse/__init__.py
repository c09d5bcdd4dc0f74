"""SPIN hierarchical sparse KV cache: long contexts keep their KV in a CPU tier; each decode
step attends to a query-selected part of it, fetched into a per-request HBM buffer kept with a
bucketed LRU (DESIGN.md §2–3)."""

from spin_ray.cache.stats import KVStats
from spin_ray.sparse.algorithm_config import (
    ALGORITHMS,
    AlgorithmConfig,
    FullConfig,
    QuestConfig,
    RetroInferConfig,
    SeerConfig,
    ShadowKVConfig,
)
from spin_ray.sparse.config import SparseConfig, TierPolicy

__all__ = [
    "ALGORITHMS",
    "AlgorithmConfig",
    "FullConfig",
    "KVStats",
    "QuestConfig",
    "RetroInferConfig",
    "SeerConfig",
    "ShadowKVConfig",
    "SparseConfig",
    "TierPolicy",
]
