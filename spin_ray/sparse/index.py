"""Index: the algorithm's per-partition summaries of each request's pages, which Select scores.

Every algorithm builds its summaries as the K/V is stored, on the device: a prefill chunk's
keys (and values) by `append_chunk`, a step's decode tokens by `append` (inside CUDA graphs
too). No step reads pages back from the CPU tier to index them. An algorithm with
`layout_tokens` (RetroInfer) also partitions each aligned span of a prompt as a whole once a
chunk completes it (`lay_out`), past the sink's pages and short of the prompt's local window
(both attended by page): the span's tokens are then stored in the algorithm's order — the
chunk's own rows as Offload writes them, the span's earlier pages rewritten in the CPU tier
(read from the request's HBM prefill slots, or else from the CPU tier). The chunk's own
attention reads its tokens as computed, and a later chunk reads the prefix as a set, so
neither cares about the order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from spin_ray.attention.metadata import AttentionMetadata, PrefillChunk
from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import HostTier

ContextKV = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]
"""`(layer, chunk, start, end)` → the K/V [end - start, Hkv, D] of positions start..end-1 of
the step's prefill chunk's sequence, stored before the chunk (`PrefillAttention.context_kv`)."""


class SparseIndex:
    def __init__(
        self,
        algorithm: SparseAlgorithm,
        budget: PageBudget,
        manager: TieredCacheManager,
        host: HostTier,
        counters: KVCounters,
        context_kv: ContextKV,
    ):
        self.algorithm = algorithm
        self.budget = budget
        self.page_size = budget.page_size
        self.manager = manager
        self.host = host
        self.counters = counters
        self.context_kv = context_kv

    def covered(self, context_len: int) -> int:
        """The pages the summaries cover at a decode step of this context: every complete
        page stored before it, in whole index units."""
        unit = self.algorithm.index_unit_pages
        return (context_len - 1) // self.page_size // unit * unit

    def append(
        self,
        layer: int,
        meta: AttentionMetadata,
        k: torch.Tensor,  # [N, Hkv, D] the step's new keys
        v: torch.Tensor,  # [N, Hkv, D]
        decode_rows: torch.Tensor | None,  # [Bd] int64 the decode tokens' rows, None: none
        prefills: list[PrefillChunk],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # 2 × [N, Hkv, D]
        """Fold the step's K/V into the summaries (the decode tokens in one call, each prefill
        chunk by itself) and lay out the spans the chunks complete; returns the K/V to store
        in the rows' slots (k and v themselves unless a span was laid out)."""
        slots, positions = meta.slot_mapping, meta.positions
        if not prefills:
            self.algorithm.append(layer, slots, k, v, positions)
            return k, v
        if decode_rows is not None:
            rows = decode_rows
            self.algorithm.append(layer, slots[rows], k[rows], v[rows], positions[rows])
        stored = (k, v)
        for i, (b, start, n, context_len) in enumerate(prefills):
            stored = self._append_chunk(
                layer, meta.request_ids[b], meta.page_table[b], i, start, n, context_len,
                slots, positions, k, v, stored,
            )  # fmt: skip
        return stored

    def _append_chunk(
        self, layer, request_id, table, chunk, start, n, context_len, slots, positions, k, v,
        stored,
    ):  # fmt: skip
        """Fold one chunk (rows start..start+n-1 of the step, ending at context_len) and lay
        out the spans it completes; returns `stored`, copied from (k, v) at the first span."""
        rows = slice(start, start + n)
        first = context_len - n
        self.algorithm.append_chunk(layer, slots[rows], k[rows], v[rows], first, positions[rows])
        for span in self._completed_spans(request_id, first, context_len):
            if stored[0] is k:
                stored = (k.clone(), v.clone())
            self._lay_out(layer, table, chunk, start, first, span, k, v, stored)
        return stored

    def _completed_spans(self, request_id: str, first: int, end: int) -> list[tuple[int, int]]:
        """The spans [a, e) of whole pages the chunk of positions first..end-1 completes: each
        aligned span of `layout_tokens` cut to the sink's pages and the prompt's local window,
        whose end lies in the chunk."""
        span = self.algorithm.layout_tokens
        if span is None:
            return []
        s = self.page_size
        sink_end = self.budget.max_sink_pages() * s
        prompt = self.manager.tokens[request_id]
        local = max(0, prompt - self.budget.local_tokens) // s * s
        spans = []
        for j in range(first // span, (end - 1) // span + 1):
            a, e = max(j * span, sink_end), min((j + 1) * span, local)
            if a < e and first < e <= end:
                spans.append((a, e))
        return spans

    def _lay_out(self, layer, table, chunk, start, first, span, k, v, stored) -> None:
        """Partition one span (positions a..e-1, whole pages): its K/V in position order from
        the prefix and the chunk, the algorithm's order, then the chunk's rows of the span into
        `stored` and the span's earlier pages rewritten in the CPU tier."""
        a, e = span
        s = self.page_size
        inside = max(a, first)  # the span's first position in the chunk
        rows = slice(start + inside - first, start + e - first)
        span_k, span_v = k[rows], v[rows]  # [m, Hkv, D]
        if a < first:  # its beginning was stored by earlier chunks
            prefix_k, prefix_v = self.context_kv(layer, chunk, a, first)
            span_k, span_v = torch.cat([prefix_k, span_k]), torch.cat([prefix_v, span_v])
        page_ids = table[a // s : e // s].long()  # [p]
        order = self.algorithm.lay_out(layer, page_ids, a // s, span_k, span_v)  # [m, Hkv]
        ordered_k, ordered_v = in_order(order, span_k), in_order(order, span_v)
        stored[0][rows] = ordered_k[inside - a :]
        stored[1][rows] = ordered_v[inside - a :]
        if a < first:  # rewrite the pages earlier chunks stored (the chunk's own follow)
            p = -(-(first - a) // s)
            hkv, d = k.shape[1:]
            k_pages, v_pages = (
                x[: p * s].view(p, s, hkv, d).permute(2, 0, 1, 3) for x in (ordered_k, ordered_v)
            )  # [Hkv, p, S, D]
            # after the host stream's pending work: a prefix read started ahead (the prefill's
            # read of this layer, issued while the layer before computed) must not see the
            # pages half rewritten
            self.host.sync()
            self.host.write_pages(layer, page_ids[:p], k_pages, v_pages)
            self.counters.d2h_bytes += p * hkv * self.host.page_bytes

    def append_prompt(
        self,
        request_id: str,
        slots: torch.Tensor,  # [T] int64 page * S + offset of each position
        table: torch.Tensor,  # [pages] int32/int64 the request's CPU-tier pages
        k: torch.Tensor,  # [T, Hkv, D] one offloaded layer's keys
        v: torch.Tensor,
        layer: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # 2 × [T, Hkv, D]
        """Fold a whole prompt's K/V of one layer, computed outside the engine, into the
        summaries and lay out its spans; returns the K/V to store (as `append`)."""
        n = slots.shape[0]
        positions = torch.arange(n, device=slots.device)  # [T]
        return self._append_chunk(
            layer, request_id, table, None, 0, n, n, slots, positions, k, v, (k, v)
        )


def in_order(
    order: torch.Tensor,  # [N, Hkv] int64
    x: torch.Tensor,  # [N, Hkv, D]
) -> torch.Tensor:  # [N, Hkv, D]
    """The rows of x as `order` stores them (row i of head h: x[order[i, h], h])."""
    return x.gather(0, order[..., None].expand_as(x))
