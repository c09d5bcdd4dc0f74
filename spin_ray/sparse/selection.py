"""Select: each decode step and offloaded layer, the algorithm scores the pages of every
(sequence, KV head) from the query and its summaries (`SparseAlgorithm.page_scores`, the
algorithm's half); the runtime's half picks sink + local window + the top-k scored pages in
between (`select_pages`), within the step's `DecodeWindows`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from spin_ray.device.step_buffers import StepBuffers, bucket, to_step
from spin_ray.kernels.partition_topk import partition_topk, partition_topk_ref
from spin_ray.sparse.algorithms.base import SelectBatch, SparseAlgorithm
from spin_ray.sparse.budget import PageBudget


@dataclass(frozen=True)
class DecodeWindows:
    """Where each decode sequence's always-attended and selectable pages lie this step."""

    num_pages: torch.Tensor  # [B] int64
    local_start: torch.Tensor  # [B] int64  first page of the local tail
    topk: torch.Tensor  # [B] int64  pages to select by score
    prefetch_topk: torch.Tensor  # [B] int64  of those, the ones a lookahead selects early
    sink_pages: int  # pages of the sink (same for every sequence past its first pages)
    max_topk: int
    max_local: int
    sink: torch.Tensor  # [B] int64  sink pages of each sequence: the selectable range's start
    sink_list: torch.Tensor  # [B, 1, sink_pages] int64  the sink pages, -1 padded
    local_list: torch.Tensor  # [B, 1, max_local] int64  the local tail, -1 padded

    @classmethod
    def build(
        cls,
        budget: PageBudget,
        context_lens: list[int],
        indexed_pages: list[int],
        device: torch.device,
        *,
        buffers: StepBuffers | None = None,
        num_padded: int = 0,
        prefetch_share: float = 1.0,
    ) -> DecodeWindows:
        """The windows of sequences with these contexts and indexed pages, then `num_padded`
        padding rows that select nothing; with `buffers` (a CUDA-graph batch) the tensors go to
        persistent buffers. The widths are the budget's bounds (sink, local) and the top-k
        rounded up to a power of two, so that steps share CUDA graphs, and a step computes the
        same numbers eagerly as in a graph (the attention kernel splits by width). The windows
        and the sink and local lists are the same for every layer, so they are built here once
        per step, the integers on the host, in one transfer; `prefetch_share`: the share of
        each top-k a lookahead selects (its best-scored pages; rounded up)."""
        num_pages = [budget.num_pages(t) for t in context_lens]
        local_start = [budget.local_start(t, i) for t, i in zip(context_lens, indexed_pages)]
        sink = [budget.sink_pages(t) for t in context_lens]
        topk = [
            min(budget.topk_pages(t), ls - s) for t, ls, s in zip(context_lens, local_start, sink)
        ]
        sink_width = budget.max_sink_pages()
        max_local = budget.max_local_pages()
        prefetch_topk = [math.ceil(round(k * prefetch_share, 9)) for k in topk]  # 10 × 0.3 -> 3
        pad = [0] * num_padded  # padding rows: no pages, so empty lists and nothing selectable
        rows = [num_pages + pad, local_start + pad, topk + pad, sink + pad, prefetch_topk + pad]
        rows = np.array(rows, dtype=np.int64)  # [5, B]
        pages, start, sinks = rows[0][:, None], rows[1][:, None], rows[3][:, None]  # [B, 1]
        sink_list = np.arange(sink_width)[None, :]  # [1, sink_width]
        sink_list = np.where(sink_list < sinks, sink_list, -1)  # [B, sink_width]
        local_list = start + np.arange(max_local)[None, :]  # [B, max_local]
        local_list = np.where(local_list < pages, local_list, -1)
        # the integers in one transfer: [5 * B] rows, then the sink and local lists
        ints = torch.from_numpy(
            np.concatenate([rows.ravel(), sink_list.ravel(), local_list.ravel()])
        )
        ints = to_step("windows.ints", ints, device, buffers)
        b = rows.shape[1]
        row_ints, sink_ints, local_ints = ints.split([5 * b, b * sink_width, b * max_local])
        num_pages_t, local_start_t, topk_t, sink_t, prefetch_topk_t = row_ints.view(5, b)
        return cls(
            num_pages=num_pages_t,
            local_start=local_start_t,
            topk=topk_t,
            prefetch_topk=prefetch_topk_t,
            sink_pages=sink_width,
            max_topk=bucket(max(topk)),
            max_local=max_local,
            sink=sink_t,
            sink_list=sink_ints.view(b, 1, sink_width),
            local_list=local_ints.view(b, 1, max_local),
        )


def select_pages(
    scores: torch.Tensor,  # [B, H, maxp] float  page scores (only the selectable range is read)
    windows: DecodeWindows,
    topk: torch.Tensor | None = None,  # [B] int64 pages to select by score (<= windows.topk)
) -> torch.Tensor:  # [B, H, K] int64 logical pages, -1 = unused
    """Sink pages, then the `topk[b]` best pages in [sink, local_start) (default
    `windows.topk`), then the local tail."""
    b, h, maxp = scores.shape
    top_partitions = partition_topk if scores.is_cuda else partition_topk_ref
    k = (windows.topk if topk is None else topk)[:, None].expand(b, h)  # [B, H]
    # a row selects in [sink, local_start): the kernel reads nothing outside it
    chosen = top_partitions(
        scores.float(), k, min(windows.max_topk, maxp), windows.local_start, windows.sink
    )
    sink = windows.sink_list.expand(b, h, -1)
    local = windows.local_list.expand(b, h, -1)
    return torch.cat([sink, chosen, local], dim=-1)


def select(
    algorithm: SparseAlgorithm,
    layer: int,  # offloaded layer
    q: torch.Tensor,  # [B, Hq, D] the decode tokens' queries
    batch: SelectBatch,
    windows: DecodeWindows,
    topk: torch.Tensor | None = None,  # [B] int64 pages to select by score (<= windows.topk)
) -> torch.Tensor:  # [B, Hkv, K] int64 logical pages, -1 = unused
    """The pages each (sequence, KV head) attends in this layer: the algorithm scores, the
    runtime picks (`select_pages`)."""
    scores = algorithm.page_scores(layer, q, batch)  # [B, Hkv, maxp]
    return select_pages(scores, windows, topk)
