"""The contract between the model and whoever owns the KV cache.

The model knows nothing of pages or sparsity: each attention layer hands its new q/k/v to the
backend and gets the attention output back. The runner calls `plan` once per step with the
batch's `AttentionMetadata`, then the model's layers call `forward` once each (FlashInfer's
plan-once / run-per-layer shape).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from spin_ray.attention.metadata import AttentionMetadata


class GraphKey(NamedTuple):
    """What a CUDA graph of a planned decode step bakes in, beyond the batch's own shapes."""

    generation: int
    """Bumped whenever the backend reallocates a tensor its layers read: graphs of an older
    generation read freed memory and must be dropped."""
    shapes: tuple
    """Shapes and launch parameters of the backend's step tensors and kernels."""


class AttentionBackend(ABC):
    """Stores each layer's new K/V into the cache and computes causal attention over it."""

    supports_cuda_graphs: bool = False
    """Whether a decode step planned from `graph_batch` metadata may be captured in a CUDA
    graph: its layers read only persistent tensors, never synchronise with the host, and keep
    no host-side per-layer state."""

    split_mixed_steps: bool = False
    """Run a step that mixes decodes and prefill chunks as two forwards: the decode rows as a
    CUDA-graph batch, then the prefill chunks eagerly (when `supports_cuda_graphs`). Worth a
    second read of the weights when the eager decode path launches many kernels per layer."""

    @abstractmethod
    def plan(self, meta: AttentionMetadata) -> None:
        """Take the metadata of the forward about to run (once per forward: one per step, two
        for a split mixed step)."""

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

    def store_prompt_kv(
        self,
        request_id: str,
        slots: torch.Tensor,  # [T] int64  page * S + offset of each position
        k: list[torch.Tensor],  # per layer [T, Hkv, D]  post-RoPE keys, computed elsewhere
        v: list[torch.Tensor],  # per layer [T, Hkv, D]
    ) -> None:
        """Store a prompt's K/V computed outside the engine (`PromptKV`) as `forward` would have
        stored them, summaries included; called between steps."""
        raise NotImplementedError(f"{type(self).__name__} takes no prompt K/V from outside")

    def lookahead_rows(self, layer_idx: int) -> torch.Tensor | None:  # [M] int64 or None
        """Rows of the batch whose query for layer `layer_idx` the model should predict one
        layer early, from the layer before's input, and hand to `prefetch`; None (the
        default): no prediction wanted."""
        return None

    def prefetch(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [M, Hq, D] predicted post-RoPE queries of `lookahead_rows`
    ) -> None:
        """Start bringing in what layer `layer_idx` will likely read (only called with the
        rows `lookahead_rows` asked for)."""
        raise NotImplementedError(f"{type(self).__name__} predicts no queries")

    def graph_key(self) -> GraphKey:
        """The key of the step just planned (from `graph_batch` metadata): steps with equal
        keys (and equal batch shapes) can replay one graph. Only called when
        `supports_cuda_graphs`."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def graph_page_width(self, max_model_len: int) -> int:
        """The least page-table width of a CUDA-graph batch (0, the default: each step's own,
        rounded up to a power of two, so a new width bucket is a new graph). A backend whose
        kernels cost the same at any width returns a fixed width, so steps keep one graph as
        contexts grow."""
        return 0

    def use_cuda_graphs(self) -> None:
        """Decode steps will replay CUDA graphs from now on (the engine calls this once, only
        when `supports_cuda_graphs`); a backend drops what a replay cannot do, e.g. timing."""

    def release(self, request_id: str) -> None:
        """Forget `request_id`'s per-request state (it finished, was preempted or aborted).
        Backends that keep none need not override this."""
