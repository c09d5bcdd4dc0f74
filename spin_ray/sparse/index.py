"""Index: the algorithm's per-partition summaries of each request's pages, which Select scores.

Incremental algorithms (Quest) fold every stored key into their summaries as it is written
(`append`, `append_prompt`), on the device. The others index complete pages read back from the
CPU tier: at a request's first decode step, then every `index_interval` decode steps
(`update`); an index may lay a page's tokens out anew (RetroInfer's clusters), and then the
pages are rewritten in the CPU tier and their stale HBM copies dropped (`forget`, Retrieve's).
Pages of the local window stay out of the index (they are attended anyway), so the local
window keeps holding the last tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spin_ray.attention.metadata import PrefillChunk
from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import HostTier


@dataclass
class _IndexState:
    indexed_pages: int = 0
    steps_since_index: int | None = None  # None: never indexed


class SparseIndex:
    def __init__(
        self,
        algorithm: SparseAlgorithm,
        budget: PageBudget,
        manager: TieredCacheManager,
        host: HostTier,
        counters: KVCounters,
        index_interval: int,
        forget: Callable[[int, str, int, int], None],
    ):
        self.algorithm = algorithm
        self.budget = budget
        self.page_size = budget.page_size
        self.manager = manager
        self.host = host
        self.counters = counters
        self.index_interval = index_interval
        self.forget = forget
        """`forget(layer, request_id, first, num_pages)`: drop the HBM copies of pages the
        index laid out anew (`Retrieve.forget`)."""
        self._state: dict[str, _IndexState] = {}

    def update(self, request_id: str, context_len: int) -> int:
        """Index the request's complete pages if due (first decode, then every
        `index_interval` steps); returns the pages the index covers (with incremental
        summaries: every complete page, nothing to do). Pages of the local window are left
        out (they are attended anyway): an index may lay their tokens out anew
        (`SparseAlgorithm.index`), and the local window must keep holding the last tokens."""
        unit = self.algorithm.index_unit_pages
        complete = (context_len - 1) // self.page_size  # stored before this step
        if self.algorithm.incremental:
            return complete // unit * unit
        window_start = max(0, context_len - self.budget.local_tokens) // self.page_size
        complete = min(complete, window_start) // unit * unit
        state = self._state.setdefault(request_id, _IndexState())
        due = state.steps_since_index is None or state.steps_since_index >= self.index_interval
        if due and complete > state.indexed_pages:
            with self.counters.timer.phase("index"):
                self._index_pages(request_id, state.indexed_pages, complete)
            state.indexed_pages = complete
            state.steps_since_index = 0
        elif state.steps_since_index is not None:
            state.steps_since_index += 1
        return state.indexed_pages

    def _index_pages(self, request_id: str, first: int, end: int) -> None:
        table = self.manager.table(request_id)[first:end]
        page_ids = torch.tensor(table, dtype=torch.int64, device=self.host.device)
        heads = self.host.k.shape[2]
        for layer in range(self.host.k.shape[0]):
            k, v = self.host.read(layer, page_ids)  # [Hkv, n, S, D]
            self.counters.h2d_bytes += page_ids.numel() * heads * self.host.page_bytes
            perm = self.algorithm.index(layer, request_id, first, page_ids, k, v)
            if perm is not None:
                self._relayout(layer, request_id, first, page_ids, k, v, perm)

    def _relayout(self, layer, request_id, first, page_ids, k, v, perm) -> None:
        """Store the pages' tokens in the algorithm's order and drop stale resident copies."""
        hkv, n, s, d = k.shape
        idx = perm.long()[:, :, None].expand(hkv, n * s, d)
        k = k.reshape(hkv, n * s, d).gather(1, idx).view(hkv, n, s, d)
        v = v.reshape(hkv, n * s, d).gather(1, idx).view(hkv, n, s, d)
        self.host.write_pages(layer, page_ids, k, v)
        self.counters.d2h_bytes += n * hkv * self.host.page_bytes
        self.forget(layer, request_id, first, n)

    def append(
        self,
        layer: int,
        slots: torch.Tensor,  # [N] int64 engine page * S + offset of every new token
        k: torch.Tensor,  # [N, Hkv, D] their keys
        positions: torch.Tensor,  # [N] int64 their positions in their sequences
        decode_rows: torch.Tensor | None,  # [Bd] int64 the decode tokens' rows, None: none
        prefills: list[PrefillChunk],
    ) -> None:
        """Fold the step's keys into incremental summaries (no-op for the others): the decode
        tokens in one call, each prefill chunk by itself (whole pages at once)."""
        if not self.algorithm.incremental:
            return
        if not prefills:
            self.algorithm.append(layer, slots, k, positions)
            return
        if decode_rows is not None:
            rows = decode_rows
            self.algorithm.append(layer, slots[rows], k[rows], positions[rows])
        for _, start, n, context_len in prefills:
            rows = slice(start, start + n)
            first_offset = (context_len - n) % self.page_size
            self.algorithm.append_chunk(layer, slots[rows], k[rows], first_offset, positions[rows])

    def append_prompt(
        self,
        slots: torch.Tensor,  # [T] int64 page * S + offset of each position
        k: list[torch.Tensor],  # per offloaded layer [T, Hkv, D]
    ) -> None:
        """Fold a whole prompt's keys into incremental summaries (no-op for the others)."""
        if self.algorithm.incremental:
            positions = torch.arange(slots.shape[0], device=slots.device)  # [T]
            for layer, layer_k in enumerate(k):
                self.algorithm.append_chunk(layer, slots, layer_k, 0, positions)

    def release(self, request_id: str) -> None:
        self._state.pop(request_id, None)
        self.algorithm.release(request_id)
