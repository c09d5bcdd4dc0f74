"""What one engine step tells every attention layer about the packed batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """One packed batch of B sequences with N new tokens in all.

    Sequence b owns the new tokens `query_start_loc[b]:query_start_loc[b+1]` of the packed
    q/k/v; after this step its KV holds `context_lens[b]` tokens (prefix + new), stored in the
    pages `page_table[b, :ceil(context_lens[b] / page_size)]`.
    """

    query_start_loc: torch.Tensor
    """[B+1] int32 on device: offsets of each sequence's new tokens in the packed batch."""
    context_lens: torch.Tensor
    """[B] int32 on device: KV length of each sequence after this step's tokens are stored."""
    page_table: torch.Tensor
    """[B, max_pages] int32 on device: physical page ids, padded with 0 past a sequence's end."""
    slot_mapping: torch.Tensor
    """[N] int64 on device: flat KV slot (page_id * page_size + offset) of each new token."""
    query_lens_cpu: tuple[int, ...]
    """Host copy: new tokens per sequence."""
    context_lens_cpu: tuple[int, ...]
    """Host copy of `context_lens`."""
    page_size: int
    request_ids: tuple[str, ...] = ()
    """Host copy: the request id of each sequence, in batch order (for per-request state);
    padding sequences have none."""
    graph_batch: bool = False
    """Planned for a CUDA graph (engine/decode_graphs.py): every sequence decodes one token,
    the page table's width is bucketed, and backends keep the tensors their layers read in
    persistent buffers with bucketed shapes (`AttentionBackend.graph_key`)."""
    num_padded: int = 0
    """The last `num_padded` sequences are padding up to a graph's batch size: one token each,
    slot -1 (nothing stored), context 1, page 0; nothing reads their outputs."""
    positions: torch.Tensor | None = None
    """[N] int64 on device: each new token's position in its sequence (what RoPE rotated it
    by); for backends whose summaries need it (Seer's un-rotated keys)."""


class PrefillChunk(NamedTuple):
    """A sequence of the batch with more than one new token."""

    seq: int
    """Its index in the batch."""
    first_row: int
    """Its first token's row in the packed q/k/v."""
    num_tokens: int
    context_len: int


@dataclass(frozen=True)
class StepSplit:
    """A step's sequences split into decodes (one new token each) and prefill chunks."""

    decode_seqs: list[int] = field(default_factory=list)
    """Batch indices of the decoding sequences."""
    decode_rows: list[int] = field(default_factory=list)
    """Their rows in the packed q/k/v."""
    prefills: list[PrefillChunk] = field(default_factory=list)

    @classmethod
    def of(cls, meta: AttentionMetadata) -> StepSplit:
        split = cls()
        start = 0
        for b, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu, strict=True)):
            if n == 1:
                split.decode_seqs.append(b)
                split.decode_rows.append(start)
            else:
                split.prefills.append(PrefillChunk(b, start, n, ctx))
            start += n
        return split
