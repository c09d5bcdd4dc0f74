"""What a KV cache tells the router: how it keeps KV (`KVLayout`, fixed for the cache's
life) and how full its tiers are now (`PageUsage`). Pages here are the router's units (see
spin_ray/serve/placement.py): a host page holds `page_size` tokens of a sequence's KV (every
offloaded layer and KV head); an HBM page is a page of the dense pool, or a working-set slot
of the tiered cache (one page of every offloaded layer and KV head)."""

from __future__ import annotations

from dataclasses import dataclass

from spin_ray.sparse.budget import PageBudget


@dataclass(frozen=True)
class KVLayout:
    """How a replica keeps KV: all in HBM (dense), or the context in the host tier with HBM
    working sets sized by `budget`."""

    page_size: int
    """Tokens per page."""
    budget: PageBudget | None = None
    """The sparse engine's page budget; None for a dense engine."""

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size: must be >= 1, got {self.page_size}")
        if self.budget is not None and self.budget.page_size != self.page_size:
            raise ValueError(
                f"budget: its page_size {self.budget.page_size} differs from {self.page_size}"
            )


@dataclass(frozen=True)
class PageUsage:
    """Pages of each tier in use and in all, now (a host tier of 0 pages: none)."""

    hbm_pages_used: int
    hbm_pages_total: int
    host_pages_used: int = 0
    host_pages_total: int = 0
