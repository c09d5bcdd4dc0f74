"""The contract between the model and whoever owns the KV cache.

The model knows nothing of pages or sparsity: each attention layer hands its new q/k/v to the
backend and gets the attention output back. The runner calls `plan` once per step with the
batch's `AttentionMetadata`, then the model's layers call `forward` once each (FlashInfer's
plan-once / run-per-layer shape).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from spin_ray.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Stores each layer's new K/V into the cache and computes causal attention over it."""

    @abstractmethod
    def plan(self, meta: AttentionMetadata) -> None:
        """Take the metadata of the step about to run (called once per step)."""

    @abstractmethod
    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [N, Hq, D]   post-RoPE queries of the new tokens
        k: torch.Tensor,  # [N, Hkv, D]  post-RoPE keys of the new tokens
        v: torch.Tensor,  # [N, Hkv, D]
        scale: float,
    ) -> torch.Tensor:  # [N, Hq, D]
        """Write k/v at the planned slots, then attend each new token to its sequence's KV
        (prefix and new tokens up to itself)."""

    def release(self, request_id: str) -> None:
        """Forget `request_id`'s per-request state (it finished, was preempted or aborted).
        Backends that keep none need not override this."""
