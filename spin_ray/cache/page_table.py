"""Per-request page tables over a `PagePool`: how many pages each request holds, grown as its
sequence grows and released at once when it finishes, is preempted or aborted."""

from __future__ import annotations

from spin_ray.cache.page_pool import PagePool


class PageTables:
    def __init__(self, pool: PagePool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self.tables: dict[str, list[int]] = {}

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def extra_pages(self, request_id: str, num_tokens: int) -> int:
        """Pages `request_id` must add to hold `num_tokens` tokens."""
        have = len(self.tables.get(request_id, ()))
        return max(0, self.pages_for(num_tokens) - have)

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.extra_pages(request_id, num_tokens))

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Make `request_id`'s table cover `num_tokens` tokens (ask `can_grow` first)."""
        extra = self.extra_pages(request_id, num_tokens)
        table = self.tables.setdefault(request_id, [])
        if extra:
            table.extend(self.pool.allocate(extra, request_id))

    def release(self, request_id: str) -> None:
        """Give back every page of `request_id` (no-op if it holds none)."""
        pages = self.tables.pop(request_id, None)
        if pages:
            self.pool.free(pages, request_id)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.tables)
