"""The unified partition abstraction: a sparse algorithm is summaries and a `select`.

An algorithm groups tokens into partitions and keeps per-partition summaries, and scores pages
from a query and those summaries (`page_scores`, every decode step and layer). Summaries are
built as the K/V is stored, on the device: a prefill chunk's by `append_chunk`, a decode
token's by `append` (also inside CUDA graphs); an algorithm with variable-size partitions
(RetroInfer's clusters) also partitions each completed span of a prompt as a whole (`lay_out`)
and has its tokens stored so each partition sits contiguously in pages. No step reads pages
back from the CPU tier to index them. Partitions map onto pages: a page's score is the
best score of the partitions it holds. The runtime owns the rest — offload, residency,
retrieval, eviction, sink/local windows, top-k and the attention kernel — and never knows an
algorithm's formula; an algorithm never touches tiers or copies. An algorithm may add its own
term to the attention (`estimate`, merged by log-sum-exp).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from spin_ray.sparse.algorithm_config import AlgorithmConfig


@dataclass(frozen=True)
class SparseGeometry:
    """Shapes the algorithms size their summaries by."""

    num_layers: int
    """Offloaded layers (the algorithm's layer 0 is model layer `first_layer`)."""
    first_layer: int
    num_cpu_pages: int
    page_size: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sink_tokens: int = 0
    """First tokens of every sequence always attended (their pages are never clustered)."""
    rope_inv_freq: torch.Tensor | None = None
    """[D/2] fp32: the model's RoPE inverse frequencies (rotate-half convention), for
    algorithms that read keys and queries before RoPE (Seer un-rotates the stored ones)."""

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class SelectBatch:
    """The decode sequences of one step, as the algorithms see them."""

    request_ids: tuple[str, ...]
    page_table: torch.Tensor
    """[B, maxp] int32: CPU-tier page id of each logical page (0 past the end)."""
    num_pages: torch.Tensor
    """[B] int64: pages holding each context."""
    indexed_pages: torch.Tensor
    """[B] int64: pages covered by the index (a prefix of the sequence)."""
    context_lens: torch.Tensor | None = None
    """[B] int64: tokens of each context; the query sits at position context_lens - 1."""


Partial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(max logit [B, Hq], Σ exp(logit - max) [B, Hq], Σ exp(logit - max)·value [B, Hq, D])."""


class SparseAlgorithm(ABC):
    name: str
    index_unit_pages: int = 1
    """The index covers whole multiples of this many complete pages."""
    layout_tokens: int | None = None
    """Positions of the aligned spans the algorithm partitions as a whole (`lay_out`): the
    runtime hands it each span of a prompt once it is stored, past the sink's pages and short
    of the prompt's local window (which are attended by page, so keep their order); the
    prompt's last span up to its local window. None: tokens stay where they are stored."""
    graph_safe: bool = False
    """`append`, `page_scores` and `estimate` read only device tensors of fixed addresses (the
    batch's and the algorithm's own, never reallocated) and never synchronise: decode steps
    may run in CUDA graphs."""

    def __init__(self, geometry: SparseGeometry, config: AlgorithmConfig):
        self.geometry = geometry
        self.config = config

    @abstractmethod
    def append(
        self,
        layer: int,
        slots: torch.Tensor,  # [N] int64  CPU-tier page * S + offset; -1 = nothing (padding)
        k: torch.Tensor,  # [N, Hkv, D]  the stored keys (post-RoPE)
        v: torch.Tensor,  # [N, Hkv, D]  the stored values
        positions: torch.Tensor,  # [N] int64  each token's position (what RoPE rotated it by)
    ) -> None:
        """Fold decode tokens, at most one per sequence, into the summaries (on the device,
        without synchronising: it runs in CUDA graphs). A page's token at offset 0 starts its
        summary afresh (the page may have held another sequence before)."""

    @abstractmethod
    def append_chunk(
        self,
        layer: int,
        slots: torch.Tensor,  # [n] int64  one prefill chunk: a request's consecutive positions
        k: torch.Tensor,  # [n, Hkv, D]
        v: torch.Tensor,  # [n, Hkv, D]
        first_position: int,  # the chunk's first position (positions[0], known on the host)
        positions: torch.Tensor,  # [n] int64
    ) -> None:
        """`append` for one prefill chunk (eager steps only), its tokens stored as they come."""

    def lay_out(
        self,
        layer: int,
        page_ids: torch.Tensor,  # [p] int64  CPU-tier pages of the span
        first_page: int,  # the span's first logical page
        k: torch.Tensor,  # [p * S, Hkv, D]  the span's keys, in position order
        v: torch.Tensor,  # [p * S, Hkv, D]
    ) -> torch.Tensor:  # [p * S, Hkv] int64
        """Partition a stored span of whole pages (algorithms with `layout_tokens`): return
        the order in which to store its tokens per KV head (row i of head h holds the span's
        token order[i, h]), so variable-size partitions sit contiguously in pages, and
        summarise the partitions in that order."""
        raise NotImplementedError(f"{self.name} keeps every token where it is stored")

    @abstractmethod
    def page_scores(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, D]  post-RoPE decode queries
        batch: SelectBatch,
    ) -> torch.Tensor:  # [B, Hkv, maxp] float32
        """Score of each indexed page (higher = attend); entries past `indexed_pages` are
        ignored by the runtime."""

    def estimate(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, D]
        batch: SelectBatch,
        pages: torch.Tensor,  # [B, Hkv, K] int64  logical pages attended exactly, -1 = none
        scale: float,
    ) -> Partial | None:
        """An extra attention term over tokens not attended exactly (none by default)."""
        return None
