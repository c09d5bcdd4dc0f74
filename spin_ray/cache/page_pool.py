"""A pool of fixed-size KV pages with ask-then-act allocation and an ownership check."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence


class CacheIntegrityError(AssertionError):
    """A page is leaked, owned twice, or both owned and free."""


class PagePool:
    """Hands out page ids 0..num_pages-1. Callers ask `can_allocate` before `allocate`;
    every page is either free or owned by exactly one owner."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages: must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(
            range(num_pages - 1, -1, -1)
        )  # stack: pop() gives low ids first
        self._owner: dict[int, Hashable] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int, owner: Hashable) -> list[int]:
        """Take n free pages for `owner`; raises if fewer are free (ask `can_allocate` first)."""
        if not self.can_allocate(n):
            raise RuntimeError(f"cannot allocate {n} pages: {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = owner
        return pages

    def free(self, pages: Sequence[int], owner: Hashable) -> None:
        """Return `owner`'s pages to the pool."""
        for p in pages:
            if self._owner.get(p) != owner:
                raise CacheIntegrityError(
                    f"page {p} freed by {owner!r} but owned by {self._owner.get(p)!r}"
                )
            del self._owner[p]
            self._free.append(p)

    def check_integrity(self, tables: Mapping[Hashable, Sequence[int]]) -> None:
        """Raise `CacheIntegrityError` unless `tables` (owner → pages) accounts for every owned
        page exactly once and no free page is owned."""
        seen: dict[int, Hashable] = {}
        for owner, pages in tables.items():
            for p in pages:
                if p in seen:
                    raise CacheIntegrityError(f"page {p} owned by both {seen[p]!r} and {owner!r}")
                if self._owner.get(p) != owner:
                    raise CacheIntegrityError(
                        f"page {p} in {owner!r}'s table but the pool records {self._owner.get(p)!r}"
                    )
                seen[p] = owner
        leaked = set(self._owner) - set(seen)
        if leaked:
            raise CacheIntegrityError(
                f"pages owned but in no table (leaked): {sorted(leaked)[:10]}"
            )
        free = set(self._free)
        if len(free) != len(self._free):
            raise CacheIntegrityError("a page is on the free list twice")
        if free & set(self._owner):
            raise CacheIntegrityError("a page is both free and owned")
        if len(free) + len(self._owner) != self.num_pages:
            raise CacheIntegrityError("pages missing from both the free list and the owners")
