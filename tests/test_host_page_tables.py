"""The numpy mirrors of page-id lists follow the lists: growth, a replaced list (preemption)
and a list that shrank are all read back exactly."""

from __future__ import annotations

import random

from spin_ray.engine.host_page_tables import HostPageTables


def test_mirrors_follow_growing_replaced_and_forgotten_lists():
    rng = random.Random(0)
    tables: dict[str, list[int]] = {}
    mirrors = HostPageTables(tables)
    for step in range(300):
        rid = f"r{rng.randrange(4)}"
        action = rng.random()
        if action < 0.7:  # the request's table grows (often by more than the array holds)
            tables.setdefault(rid, []).extend(
                rng.randrange(10**6) for _ in range(rng.randrange(40))
            )
        elif action < 0.85:  # preempted and admitted again: a new list, shorter or longer
            tables[rid] = [rng.randrange(10**6) for _ in range(rng.randrange(60))]
        elif action < 0.9:  # the same list object, cut shorter
            del tables.setdefault(rid, [])[rng.randrange(len(tables[rid]) + 1) :]
        else:
            mirrors.keep_only(r for r in tables if r != rid)
        for request_id, table in tables.items():
            assert mirrors.row(request_id).tolist() == table, f"step {step}"
