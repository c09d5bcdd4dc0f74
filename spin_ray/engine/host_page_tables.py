"""numpy mirrors of the requests' page-id lists, for building a step's tensors.

A step's page table is [B, pages]: built from Python lists it cost milliseconds per step at
long contexts (8 × 4,000 pages). The lists only grow in place while a request runs (a request
that gives its pages back gets a new list), so each request's array is extended by the new
pages; a list that was replaced (preempted and admitted again) or is shorter is copied afresh.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class HostPageTables:
    def __init__(self, tables: dict[str, list[int]]):
        self.tables = tables
        """The cache's live page-id lists (request id → page ids), read, never written."""
        self._mirrors: dict[str, tuple[list[int], np.ndarray, int]] = {}  # list, array, length

    def row(self, request_id: str) -> np.ndarray:  # [pages] int64
        """The request's page ids now."""
        table = self.tables[request_id]
        mirror = self._mirrors.get(request_id)
        if mirror is None or mirror[0] is not table or mirror[2] > len(table):
            mirror = (table, np.empty(max(16, len(table)), dtype=np.int64), 0)
        _, array, length = mirror
        if len(table) > length:
            if len(table) > len(array):  # grow by doubling
                array = np.concatenate([array[:length], np.empty(len(table), dtype=np.int64)])
            array[length : len(table)] = table[length:]
        self._mirrors[request_id] = (table, array, len(table))
        return array[: len(table)]

    def keep_only(self, request_ids: Iterable[str]) -> None:
        """Forget the mirrors of every other request (finished or not running)."""
        keep = set(request_ids)
        for request_id in [r for r in self._mirrors if r not in keep]:
            del self._mirrors[request_id]
