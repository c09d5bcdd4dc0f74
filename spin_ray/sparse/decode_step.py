"""The layout of a step's decode sequences, planned once per step and read by Select, Retrieve
and Attention on every offloaded layer: fixed-shape device tensors with bucketed widths, so a
step computes the same numbers eagerly as in a CUDA graph, and in a CUDA-graph batch
(`AttentionMetadata.graph_batch`) persistent buffers whose padding rows select nothing and
store into the GPU tier's scratch slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.device.step_buffers import StepBuffers, to_device_async, to_step
from spin_ray.sparse.algorithms.base import SelectBatch
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.selection import DecodeWindows


@dataclass(frozen=True)
class DecodeStep:
    """The decode sequences of this step."""

    tokens: torch.Tensor  # [Bd] int64 rows of the packed batch
    rows: torch.Tensor  # [Bd] int64 residency directory rows
    context_lens: torch.Tensor  # [Bd] int64
    context_lens_cpu: tuple[int, ...]  # the real rows' (padding rows have none)
    last_page: torch.Tensor  # [Bd] int64 logical page of the new token
    last_offset: torch.Tensor  # [Bd] int64 its row in that page
    slot_lists: torch.Tensor  # [Bd, n_max] int64 each request's GPU slots, -1 padded
    slot_counts: torch.Tensor  # [Bd] int64 how many (each list's first entries)
    listed_heads: torch.Tensor  # [Bd * Hkv * K] int64 the head of each listed page, flattened
    windows: DecodeWindows
    batch: SelectBatch


class DecodeStepPlanner:
    """Builds each step's `DecodeStep` from the batch metadata and the cache manager."""

    def __init__(
        self,
        manager: TieredCacheManager,
        budget: PageBudget,
        num_kv_heads: int,
        device: torch.device,
        prefetch_share: float,
    ):
        self.manager = manager
        self.budget = budget
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.prefetch_share = prefetch_share
        """The share of each top-k a lookahead selects (`SparseConfig.lookahead_share`)."""
        self.buffers = StepBuffers(device)
        """Persistent step tensors of CUDA-graph batches."""
        self._heads_of_lists: dict[tuple[int, int], torch.Tensor] = {}
        """(rows, list width) → the KV head of each listed page, flattened (`_listed_heads`)."""

    def plan(
        self,
        meta: AttentionMetadata,
        decode: list[int],  # batch indices of the decode sequences (the last num_padded: padding)
        tokens: list[int],  # their rows in the packed batch
        indexed: list[int],  # the pages each real row's index covers (`SparseIndex.covered`)
    ) -> DecodeStep:
        """Lay out the decode sequences, with bucketed widths (slot lists, windows: the same
        shapes eagerly as in a CUDA graph, so the same numbers); for a CUDA-graph batch
        (`meta.graph_batch`: decode only, the last `num_padded` rows padding) in persistent
        buffers, the padding rows selecting nothing and storing into the scratch slot."""
        manager, page_size = self.manager, self.budget.page_size
        pad = meta.num_padded
        real = decode[: len(decode) - pad]
        request_ids = tuple(meta.request_ids[b] for b in real)
        contexts = [meta.context_lens_cpu[b] for b in real]
        device = self.device
        buffers = self.buffers if meta.graph_batch else None

        def placed(name, values):  # host or device values -> the step's device tensor
            return to_step(name, values, device, buffers)

        # the per-row integers in one transfer, [7, Bd]: the real rows, then the padding's
        # (it stores into the scratch slot: last page -2 is listed nowhere; it holds no slots)
        ints = placed("decode_ints", torch.tensor([
            tokens,
            [manager.rows[rid] for rid in request_ids] + [0] * pad,
            contexts + [0] * pad,
            [(t - 1) // page_size for t in contexts] + [-2] * pad,
            [(t - 1) % page_size for t in contexts] + [0] * pad,
            indexed + [0] * pad,
            [len(manager.slots[rid]) for rid in request_ids] + [0] * pad,
        ], dtype=torch.int64))  # fmt: skip
        tokens_t, rows, context_lens, last_page, last_offset, indexed_pages, slot_counts = ints

        if meta.graph_batch:  # decode only: every row is a decode row (a persistent buffer)
            table_i32 = meta.page_table  # [Bd, maxp] int32
        else:
            rows_t = to_device_async(torch.tensor(decode), meta.page_table.device)  # [Bd]
            table_i32 = meta.page_table[rows_t]
        slot_lists = placed("slot_lists", manager.slot_lists(request_ids, rows))  # [Bd, n]
        windows = DecodeWindows.build(
            self.budget, contexts, indexed, device,
            buffers=buffers, num_padded=pad, prefetch_share=self.prefetch_share,
        )  # fmt: skip
        listed = windows.sink_pages + min(windows.max_topk, table_i32.shape[1]) + windows.max_local
        return DecodeStep(
            tokens=tokens_t,
            rows=rows,
            context_lens=context_lens,
            context_lens_cpu=tuple(contexts),
            last_page=last_page,
            last_offset=last_offset,
            slot_lists=slot_lists,
            slot_counts=slot_counts,
            listed_heads=self._listed_heads(len(decode), listed),
            windows=windows,
            batch=SelectBatch(
                request_ids=request_ids,
                page_table=table_i32,
                num_pages=windows.num_pages,
                indexed_pages=indexed_pages,
                context_lens=context_lens,
            ),
        )

    def _listed_heads(self, rows: int, width: int) -> torch.Tensor:  # [rows * Hkv * width]
        """The KV head of each entry of `rows` × Hkv page lists of `width`, flattened: the same
        for every step of that shape, so built once (and at one address, for CUDA graphs)."""
        heads = self._heads_of_lists.get((rows, width))
        if heads is None:
            hkv = self.num_kv_heads
            heads = torch.arange(hkv, device=self.device)[None, :, None].expand(rows, hkv, width)
            heads = self._heads_of_lists[(rows, width)] = heads.flatten()
        return heads
