"""Per-step page choice of the decode sequences: sink + local window + the top-k scored pages
in between, for each (sequence, KV head) — the runtime half of `select`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spin_ray.attention.step_buffers import StepBuffers, bucket
from spin_ray.kernels.partition_topk import partition_topk, partition_topk_ref
from spin_ray.sparse.budget import PageBudget


@dataclass(frozen=True)
class DecodeWindows:
    """Where each decode sequence's always-attended and selectable pages lie this step."""

    num_pages: torch.Tensor  # [B] int64
    local_start: torch.Tensor  # [B] int64  first page of the local tail
    topk: torch.Tensor  # [B] int64  pages to select by score
    sink_pages: int  # pages of the sink (same for every sequence past its first pages)
    max_topk: int
    max_local: int

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
    ) -> DecodeWindows:
        """The windows of sequences with these contexts and indexed pages, then `num_padded`
        padding rows that select nothing; with `buffers` (a CUDA-graph batch) the tensors go to
        persistent buffers. The widths are the budget's bounds (sink, local) and the top-k
        rounded up to a power of two, so that steps share CUDA graphs, and a step computes the
        same numbers eagerly as in a graph (the attention kernel splits by width)."""
        num_pages = [budget.num_pages(t) for t in context_lens]
        local_start = [budget.local_start(t, i) for t, i in zip(context_lens, indexed_pages)]
        sink = [budget.sink_pages(t) for t in context_lens]
        topk = [
            min(budget.topk_pages(t), ls - s) for t, ls, s in zip(context_lens, local_start, sink)
        ]
        max_topk = max(topk)

        def tensor(name: str, values: list[int]) -> torch.Tensor:
            host = torch.tensor(values + [0] * num_padded, dtype=torch.int64)
            return host.to(device) if buffers is None else buffers.put(name, host)

        return cls(
            num_pages=tensor("windows.num_pages", num_pages),
            local_start=tensor("windows.local_start", local_start),
            topk=tensor("windows.topk", topk),
            sink_pages=-(-budget.sink_tokens // budget.page_size),
            max_topk=bucket(max_topk),
            max_local=budget.max_local_pages(),
        )


def select_pages(
    scores: torch.Tensor,  # [B, H, maxp] float  page scores (only the selectable range is read)
    windows: DecodeWindows,
) -> torch.Tensor:  # [B, H, K] int64 logical pages, -1 = unused
    """Sink pages, then the `topk[b]` best pages in [sink, local_start), then the local tail."""
    b, h, maxp = scores.shape
    device = scores.device
    page = torch.arange(maxp, device=device)
    sink = torch.clamp(windows.num_pages, max=windows.sink_pages)  # [B]
    selectable = (page >= sink[:, None]) & (page < windows.local_start[:, None])  # [B, maxp]
    masked = scores.float().masked_fill(~selectable[:, None, :], float("-inf"))
    top_partitions = partition_topk if masked.is_cuda else partition_topk_ref
    k = windows.topk[:, None].expand(b, h)  # [B, H]
    chosen = top_partitions(masked, k, min(windows.max_topk, maxp))  # [B, H, <= max_topk]
    sink_pages = torch.arange(windows.sink_pages, device=device).expand(b, h, -1)
    sink_pages = torch.where(sink_pages < sink[:, None, None], sink_pages, -1)
    local = windows.local_start[:, None] + torch.arange(windows.max_local, device=device)  # [B, L]
    local = torch.where(local < windows.num_pages[:, None], local, -1)
    return torch.cat([sink_pages, chosen, local[:, None, :].expand(b, h, -1)], dim=-1)


def page_token_counts(
    pages: torch.Tensor,  # [B, H, K] int64, -1 = unused
    context_lens: torch.Tensor,  # [B]
    page_size: int,
) -> torch.Tensor:  # [B, H, K] int32
    """Valid tokens of each listed page (the last page of a sequence may be partial)."""
    left = context_lens.long()[:, None, None] - pages.clamp(min=0) * page_size
    return torch.where(pages >= 0, left.clamp(0, page_size), 0).int()
