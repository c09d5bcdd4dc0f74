"""Attention: each decode token attends, per KV head, over the tokens of the pages Select chose
for it, read from the GPU-tier slots Retrieve put them in (sparse paged attention, split-K
over the pages, merged by log-sum-exp), plus the algorithm's own term where it adds one
(`SparseAlgorithm.estimate`, e.g. RetroInfer's estimation zone)."""

from __future__ import annotations

import torch

from spin_ray.kernels.sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.decode_step import DecodeStep
from spin_ray.sparse.tiers import DeviceTier


class SparseDecodeAttention:
    def __init__(self, algorithm: SparseAlgorithm, gpu: DeviceTier):
        self.algorithm = algorithm
        self.gpu = gpu
        on_cuda = gpu.k.device.type == "cuda"
        self._attend = sparse_decode_attention if on_cuda else sparse_decode_attention_ref

    def __call__(
        self,
        layer: int,  # offloaded layer (the algorithm's)
        tier_layer: int,  # the GPU tier's layer holding its slots (`Retrieve.tier_layer`)
        q: torch.Tensor,  # [Bd, Hq, D]
        pages: torch.Tensor,  # [Bd, Hkv, K] int64 selected logical pages, -1 = none
        slots: torch.Tensor,  # [Bd, Hkv, K] int64 their slots
        step: DecodeStep,
        scale: float,
    ) -> torch.Tensor:  # [Bd, Hq, D]
        extra = self.algorithm.estimate(layer, q, step.batch, pages, scale)
        k_slots, v_slots = self.gpu.k[tier_layer], self.gpu.v[tier_layer]
        return self._attend(q, k_slots, v_slots, slots, pages, step.context_lens, scale, extra)
