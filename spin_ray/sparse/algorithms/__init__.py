"""Sparse attention algorithms, each summaries (`index` or `append`) + `page_scores` over the
runtime's pages."""

from __future__ import annotations

from spin_ray.sparse.algorithms.base import SelectBatch, SparseAlgorithm, SparseGeometry
from spin_ray.sparse.algorithms.full import FullSelection
from spin_ray.sparse.algorithms.quest import Quest
from spin_ray.sparse.algorithms.retroinfer import RetroInfer
from spin_ray.sparse.algorithms.seer import Seer
from spin_ray.sparse.algorithms.shadowkv import ShadowKV
from spin_ray.sparse.config import SparseConfig

ALGORITHM_CLASSES: dict[str, type[SparseAlgorithm]] = {
    cls.name: cls for cls in (FullSelection, Quest, ShadowKV, RetroInfer, Seer)
}


def build_algorithm(geometry: SparseGeometry, config: SparseConfig) -> SparseAlgorithm:
    return ALGORITHM_CLASSES[config.algorithm.name](geometry, config.algorithm)


__all__ = ["SelectBatch", "SparseAlgorithm", "SparseGeometry", "build_algorithm"]
