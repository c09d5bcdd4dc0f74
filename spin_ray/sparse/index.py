"""Index: the algorithm's per-partition summaries of each request's pages, which Select scores.

Every algorithm builds its summaries as the K/V is stored, on the device: a prefill chunk's
keys (and values) by `append_chunk`, a step's decode tokens by `append` (inside CUDA graphs
too). No step reads pages back from the CPU tier to index them. An algorithm may lay a prefill
chunk's whole pages out anew (RetroInfer's clusters): `append` then returns the order in which
the runtime stores the step's tokens, per KV head (Offload writes them so; the chunk's own
attention still reads them as computed, and a later chunk reads the prefix as a set).
"""

from __future__ import annotations

import torch

from spin_ray.attention.metadata import AttentionMetadata, PrefillChunk
from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.manager import TieredCacheManager


class SparseIndex:
    def __init__(self, algorithm: SparseAlgorithm, budget: PageBudget, manager: TieredCacheManager):
        self.algorithm = algorithm
        self.budget = budget
        self.page_size = budget.page_size
        self.manager = manager

    def covered(self, context_len: int) -> int:
        """The pages the summaries cover at a decode step of this context: every complete
        page stored before it, in whole index units."""
        unit = self.algorithm.index_unit_pages
        return (context_len - 1) // self.page_size // unit * unit

    def local_start(self, request_id: str) -> int:
        """The first position of a prefilling request's local window at its first decode
        step (its prompt's last `local_tokens`): those tokens stay where they are stored."""
        return max(0, self.manager.tokens[request_id] - self.budget.local_tokens)

    def append(
        self,
        layer: int,
        meta: AttentionMetadata,
        k: torch.Tensor,  # [N, Hkv, D] the step's new keys
        v: torch.Tensor,  # [N, Hkv, D]
        decode_rows: torch.Tensor | None,  # [Bd] int64 the decode tokens' rows, None: none
        prefills: list[PrefillChunk],
    ) -> torch.Tensor | None:  # [N, Hkv] int64 or None
        """Fold the step's keys into the summaries: the decode tokens in one call, each prefill
        chunk by itself. Returns the order in which to store the step's rows per KV head (row
        i of head h stores token order[i, h]) when an algorithm laid a chunk out anew."""
        slots, positions = meta.slot_mapping, meta.positions
        if not prefills:
            self.algorithm.append(layer, slots, k, v, positions)
            return None
        if decode_rows is not None:
            rows = decode_rows
            self.algorithm.append(layer, slots[rows], k[rows], v[rows], positions[rows])
        order = None
        for b, start, n, context_len in prefills:
            rows = slice(start, start + n)
            chunk_order = self.algorithm.append_chunk(
                layer, slots[rows], k[rows], v[rows], context_len - n, positions[rows],
                self.local_start(meta.request_ids[b]),
            )  # fmt: skip
            if chunk_order is not None:
                if order is None:
                    order = torch.arange(k.shape[0], device=k.device)[:, None].repeat(1, k.shape[1])
                order[rows] = start + chunk_order
        return order

    def append_prompt(
        self,
        request_id: str,
        slots: torch.Tensor,  # [T] int64 page * S + offset of each position
        k: torch.Tensor,  # [T, Hkv, D] one offloaded layer's keys
        v: torch.Tensor,
        layer: int,
    ) -> torch.Tensor | None:  # [T, Hkv] int64 or None
        """Fold a whole prompt's K/V of one layer, computed outside the engine, into the
        summaries; returns the order to store it in (as `append`), or None."""
        positions = torch.arange(slots.shape[0], device=slots.device)  # [T]
        local_start = self.local_start(request_id)
        return self.algorithm.append_chunk(layer, slots, k, v, 0, positions, local_start)


def in_order(
    order: torch.Tensor | None,  # [N, Hkv] int64
    x: torch.Tensor,  # [N, Hkv, D]
) -> torch.Tensor:  # [N, Hkv, D]
    """The rows of x as `order` stores them (row i of head h: x[order[i, h], h])."""
    if order is None:
        return x
    return x.gather(0, order[..., None].expand_as(x))
