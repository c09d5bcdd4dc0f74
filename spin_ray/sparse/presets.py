"""The named engines the benchmark and the accuracy sweep compare: the dense engine and the
baselines SPIN is measured against. Each is a whole `SparseConfig` made from spin's settings
(or None: the dense engine), not an engine mode that overrides fields."""

from __future__ import annotations

from dataclasses import replace

from spin_ray.sparse.algorithm_config import FullConfig
from spin_ray.sparse.config import SparseConfig, TierPolicy

PRESETS = ("dense", "dense-offload", "sparse-naive", "spin")
"""dense: all KV in HBM, no sparse cache. dense-offload: KV in host memory, every layer reads
the whole context back each step (the `full` algorithm, no buffer, no dense layers).
sparse-naive: spin's algorithm and budget with no HBM buffer, every selected page fetched
every step (SPIN's ablation). spin: the settings as given, with the HBM buffer."""


def preset(name: str, spin: SparseConfig) -> SparseConfig | None:
    """The config of preset `name`, made from `spin` (the settings of the spin preset)."""
    if name == "dense":
        return None
    if name == "spin":
        return replace(spin, tiers=TierPolicy.SPIN)
    no_lookahead = dict(tiers=TierPolicy.NAIVE, lookahead=False, lookahead_share=1.0)
    if name == "sparse-naive":
        return replace(spin, **no_lookahead)
    if name == "dense-offload":
        return replace(spin, algorithm=FullConfig(), dense_layers=0, **no_lookahead)
    raise ValueError(f"preset: unknown preset {name!r}; use one of {PRESETS}")
