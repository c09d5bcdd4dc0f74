"""Offload: every new token's K/V of the offloaded layers goes to the CPU tier as it is
computed (on CUDA by a store kernel on the host tier's side stream, overlapping compute), so
HBM holds working sets, not whole contexts. The CPU tier then holds every request's whole
context; the GPU tier only the pages Retrieve brings back (and a prefill's own slots)."""

from __future__ import annotations

import torch

from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import HostTier


class Offload:
    def __init__(self, host: HostTier, counters: KVCounters):
        self.host = host
        self.counters = counters
        layers, _, heads, page_size, _ = host.k.shape
        self.bytes_per_token = layers * heads * host.page_bytes // page_size
        """Bytes of K + V one token takes in the CPU tier (every offloaded layer and head)."""

    def begin_step(self, meta: AttentionMetadata) -> None:
        """Order this step's reads of the CPU tier after the pending stores, and count the
        step's new tokens (padding excluded) as offloaded."""
        self.host.sync()
        new_tokens = sum(meta.query_lens_cpu) - meta.num_padded
        self.counters.d2h_bytes += new_tokens * self.bytes_per_token

    def store(
        self,
        layer: int,  # offloaded layer
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
        slots: torch.Tensor,  # [N] int64 engine page * S + offset
    ) -> None:
        """Write the layer's new tokens into the CPU tier (counted by `begin_step`)."""
        self.host.store(layer, k, v, slots)

    def store_prompt(
        self,
        slots: torch.Tensor,  # [T] int64 page * S + offset of each position
        k: list[torch.Tensor],  # per offloaded layer [T, Hkv, D]
        v: list[torch.Tensor],
    ) -> None:
        """Write a whole prompt's K/V, computed outside the engine, and count it."""
        for layer, (layer_k, layer_v) in enumerate(zip(k, v, strict=True)):
            self.host.store(layer, layer_k, layer_v, slots)
        self.counters.d2h_bytes += slots.numel() * self.bytes_per_token
