"""Page counts of one sequence at context length T: what a decode step attends (sink + local
+ top-k selected pages) and what the request may keep in HBM (mandatory + buffer).

All counts are per (offloaded layer, KV head); the same numbers hold for every one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spin_ray.sparse.config import SparseConfig

MAX_TARGET_PAGES = 8192
"""Buffers grow to at most this many pages per request: the most candidate slots one program
of the fused retrieval kernel holds (`spin_ray.kernels.spin_retrieve.fits`); longer slot lists
take the slower torch path."""


@dataclass(frozen=True)
class PageBudget:
    page_size: int
    token_budget: int | float
    """Attended tokens per step (int) or fraction of the context (float)."""
    sink_tokens: int
    local_tokens: int
    max_unindexed_tokens: int
    """Most tokens at the end of a sequence the index may not cover yet (always attended)."""
    attend_all: bool
    """Every page is attended (the "full" algorithm of the dense-offload baseline)."""
    retains: bool
    """Pages stay in HBM across steps, so requests get buffer pages beyond the mandatory."""
    buffer_ratio: float
    min_buffer_ratio: float
    max_target_pages: int | None = None
    """Most HBM pages a request grows its buffer to (never below its floor); None: no cap."""

    @classmethod
    def from_config(cls, config: SparseConfig, page_size: int, index_unit_pages: int) -> PageBudget:
        """The summaries cover every complete page in whole units of `index_unit_pages`, so
        at most that many pages at a sequence's end are not indexed (the last one partial)."""
        unindexed = index_unit_pages * page_size
        return cls(
            page_size=page_size,
            token_budget=config.token_budget,
            sink_tokens=config.sink_tokens,
            local_tokens=config.local_tokens,
            max_unindexed_tokens=unindexed,
            attend_all=config.algorithm.attends_all,
            retains=config.retains,
            buffer_ratio=config.buffer_ratio,
            min_buffer_ratio=min(config.min_buffer_ratio, config.buffer_ratio),
            max_target_pages=MAX_TARGET_PAGES,
        )

    def num_pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def max_sink_pages(self) -> int:
        """Pages of the sink once a context reaches past it."""
        return -(-self.sink_tokens // self.page_size)

    def sink_pages(self, num_tokens: int) -> int:
        return min(self.num_pages(num_tokens), self.max_sink_pages())

    def local_start(self, num_tokens: int, indexed_pages: int) -> int:
        """First page of the always-attended tail: the local window, extended back over pages
        the index does not cover; never inside the sink."""
        window_start = max(0, num_tokens - self.local_tokens) // self.page_size
        return max(self.sink_pages(num_tokens), min(indexed_pages, window_start))

    def max_local_pages(self) -> int:
        """Upper bound of `num_pages - local_start` for any context."""
        window = -(-self.local_tokens // self.page_size) + 1
        unindexed = -(-self.max_unindexed_tokens // self.page_size) + 1
        return max(window, unindexed)

    def topk_pages(self, num_tokens: int) -> int:
        """Pages selected by score beyond the sink and local window."""
        n = self.num_pages(num_tokens)
        if self.attend_all:
            return n
        if isinstance(self.token_budget, float):
            budget_tokens = math.ceil(self.token_budget * num_tokens)
        else:
            budget_tokens = self.token_budget
        fixed = self.sink_pages(num_tokens) + -(-self.local_tokens // self.page_size)
        return max(0, -(-budget_tokens // self.page_size) - fixed)

    def mandatory_pages(self, num_tokens: int) -> int:
        """Upper bound of the pages one decode step at this context attends."""
        n = self.num_pages(num_tokens)
        if self.attend_all:
            return n
        sink, top = self.sink_pages(num_tokens), self.topk_pages(num_tokens)
        return min(n, sink + self.max_local_pages() + top)

    def floor_pages(self, num_tokens: int) -> int:
        """HBM pages a request needs to run: mandatory plus the buffer floor."""
        return self._with_buffer(num_tokens, self.min_buffer_ratio)

    def target_pages(self, num_tokens: int) -> int:
        """HBM pages a request keeps when HBM is free: mandatory plus the full buffer, at most
        `max_target_pages` (or the floor, when that is higher)."""
        target = self._with_buffer(num_tokens, self.buffer_ratio)
        if self.max_target_pages is None:
            return target
        return min(target, max(self.max_target_pages, self.floor_pages(num_tokens)))

    def _with_buffer(self, num_tokens: int, ratio: float) -> int:
        mandatory = self.mandatory_pages(num_tokens)
        if not self.retains:
            return mandatory
        return min(self.num_pages(num_tokens), math.ceil(mandatory * (1.0 + ratio)))
