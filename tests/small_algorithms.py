"""Algorithm settings with partitions small enough for the tests' few-page contexts."""

from __future__ import annotations

from spin_ray.sparse.algorithm_config import ALGORITHM_CONFIGS, AlgorithmConfig


def small_algorithm(name: str, page_size: int, **settings) -> AlgorithmConfig:
    """`name`'s settings with blocks, segments, clusters and chunks of a few pages (or
    tokens), overridden by `settings`."""
    small = {
        "seer": dict(block_size=2 * page_size),
        "retroinfer": dict(segment_tokens=8 * page_size, cluster_tokens=4, kmeans_iters=3),
        "shadowkv": dict(chunk_size=2),
    }
    return ALGORITHM_CONFIGS[name](**(small.get(name, {}) | settings))
