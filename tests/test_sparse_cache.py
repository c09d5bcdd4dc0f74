"""The two-tier cache manager and its two-level residency tables: ownership in both tiers under
random arrivals, growth, prefill slots, aborts and finishes (hypothesis); bucketed-LRU
shrinking; HBM floors; metadata that follows the resident working set."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spin_ray.cache.page_pool import CacheIntegrityError
from spin_ray.kernels.residency_ref import touch_ref
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.residency import ResidencyTable
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import pinned_empty

PAGE = 4
LAYERS, HEADS, BUCKETS = 2, 2, 8


def _budget(**overrides) -> PageBudget:
    fields = dict(
        page_size=PAGE,
        token_budget=16,
        sink_tokens=4,
        local_tokens=4,
        max_unindexed_tokens=8,
        attend_all=False,
        retains=True,
        buffer_ratio=2.0,
        min_buffer_ratio=0.5,
    )
    fields.update(overrides)
    return PageBudget(**fields)


def _manager(cpu_pages=64, slots=40, **budget) -> TieredCacheManager:
    residency = ResidencyTable(LAYERS, HEADS, slots, 4, BUCKETS, "cpu")
    return TieredCacheManager(
        cpu_pages, slots, _budget(**budget), residency, KVCounters(torch.device("cpu"))
    )


def _populate(manager: TieredCacheManager, request_id: str, rng: random.Random) -> None:
    """Make some of the request's pages resident (or not) in random (layer, head)s, with
    random recency, the way decode steps would."""
    residency = manager.residency
    slots = manager.slots[request_id]
    num_pages = len(manager.tables[request_id])
    row = torch.tensor([manager.rows[request_id]])
    for _ in range(3):
        layer, head = rng.randrange(LAYERS), rng.randrange(HEADS)
        page = rng.randrange(num_pages)
        pages = torch.full((1, HEADS, 1), -1)
        pages[0, head, 0] = page
        found = int(residency.lookup(row, layer, pages)[0, head, 0])
        idx = torch.tensor(slots)
        empty = idx[residency.slot_page[layer, head, idx] < 0].tolist()
        if found >= 0 and rng.random() < 0.4:
            residency.remove(layer, torch.tensor([head]), torch.tensor([found]))
        elif found < 0 and empty:
            slot = torch.tensor([rng.choice(empty)])
            residency.insert(layer, torch.tensor([head]), slot, torch.tensor([page]))
            residency.slot_bucket[layer, head, slot] = rng.randrange(BUCKETS)


operations = st.lists(
    st.tuples(
        st.sampled_from(
            ["arrive", "grow", "finish", "abort", "populate", "age", "hold", "end_prefill"]
        ),
        st.integers(0, 7),
        st.integers(1, 90),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, seed=st.integers(0, 2**16))
# found by hypothesis: a request holds its prefill slots, grows a page, and asks again
@example(ops=[("arrive", 0, 4), ("hold", 0, 1), ("grow", 0, 1), ("hold", 0, 1)], seed=0)
def test_no_page_leaked_or_double_owned_in_either_tier(ops, seed):
    """Random arrivals, growth, aborts and finishes, with scheduler semantics (ask
    `can_grow` before `grow`; a request that cannot grow is preempted, i.e. released): after
    every operation both tiers and the residency maps are consistent, and every request holds
    at least its HBM floor. Prefill slots cover the context the request had when it first held
    them; asking again returns the same slots, however it grew since."""
    rng = random.Random(seed)
    manager = _manager()
    tokens: dict[str, int] = {}
    held_for: dict[str, int] = {}  # request -> pages its prefill slots were taken for
    for op, who, amount in ops:
        live = sorted(tokens)
        if op == "arrive":
            rid = f"r{who}"
            if rid not in tokens and manager.can_grow(rid, amount):
                manager.grow(rid, amount)
                tokens[rid] = amount
        elif op == "grow" and live:
            rid = live[who % len(live)]
            target = tokens[rid] + amount
            if manager.can_grow(rid, target):
                manager.grow(rid, target)
                tokens[rid] = target
            else:  # preempted for recompute
                manager.release(rid)
                del tokens[rid]
                held_for.pop(rid, None)
        elif op in ("finish", "abort") and live:
            rid = live[who % len(live)]
            manager.release(rid)
            del tokens[rid]
            held_for.pop(rid, None)
        elif op == "populate" and live:
            _populate(manager, live[who % len(live)], rng)
        elif op == "age":
            manager.residency.age()
        elif op == "hold" and live:
            rid = live[who % len(live)]
            free, reclaimable = manager.slot_pool.num_free, manager._reclaimable(rid)
            held = manager.hold_prefill(rid)
            need = held_for.get(rid, manager.pages_for(tokens[rid]))
            if held is None:
                assert rid not in held_for and need > free + reclaimable
            else:
                held_for.setdefault(rid, need)
                assert len(held) == need == len(set(held))
                assert not set(held) & set(manager.slots[rid])
        elif op == "end_prefill" and live:
            manager.end_prefill(live[who % len(live)])
            held_for.pop(live[who % len(live)], None)
        manager.check_integrity()
        for rid, n in tokens.items():
            assert len(manager.table(rid)) == manager.pages_for(n)
            assert len(manager.slots[rid]) >= manager.budget.floor_pages(n)
            assert manager.budget.floor_pages(n) >= manager.budget.mandatory_pages(n)
    for rid in list(tokens):
        manager.release(rid)
    manager.check_integrity()
    assert manager.pool.num_free == manager.pool.num_pages
    assert manager.slot_pool.num_free == manager.slot_pool.num_pages
    assert manager.residency.segments_in_use == 0


def test_integrity_check_catches_a_stale_residency_entry():
    manager = _manager()
    manager.grow("a", 40)
    _populate(manager, "a", random.Random(0))
    manager.check_integrity()
    slot = manager.slots["a"][0]
    manager.residency.slot_page[0, 0, slot] = 9  # claims a page the forward map never saw
    try:
        manager.check_integrity()
    except CacheIntegrityError:
        return
    raise AssertionError("a slot/page-table disagreement went unnoticed")


def test_buffer_shrinks_oldest_first_and_never_below_the_floor():
    """A newcomer that needs HBM takes it from the buffer of a running request: the slots
    given back are the ones whose newest page is oldest (bucketed LRU), and the running request
    keeps at least its floor."""
    manager = _manager(slots=30, buffer_ratio=3.0)
    manager.grow("old", 100)  # 25 pages; takes its target from 30 free slots
    slots = list(manager.slots["old"])
    assert len(slots) == manager.budget.target_pages(100) < 30
    residency = manager.residency
    for i, slot in enumerate(slots):  # slot i holds page i in (layer 0, head 1), recency by i
        residency.insert(0, torch.tensor([1]), torch.tensor([slot]), torch.tensor([i]))
        residency.slot_bucket[0, 1, slot] = min(i // 3, BUCKETS - 1)
    free_before = manager.slot_pool.num_free
    floor_new = manager.budget.floor_pages(60)
    assert floor_new > free_before, "the newcomer must take slots from the running request"
    assert manager.can_grow("new", 60)
    manager.grow("new", 60)
    manager.check_integrity()
    taken = floor_new - free_before
    kept = manager.slots["old"]
    assert len(kept) == len(slots) - taken >= manager.budget.floor_pages(100)
    assert sorted(kept) == sorted(slots[taken:]), "the oldest pages' slots went first"
    assert manager.counters.snapshot().evictions == taken
    assert len(manager.slots["new"]) == floor_new


def test_can_grow_refuses_when_cpu_tier_or_hbm_floor_cannot_be_met():
    manager = _manager(cpu_pages=10, slots=40)
    assert manager.can_grow("a", 40) and not manager.can_grow("a", 41)  # 10 pages of 4
    manager = _manager(cpu_pages=100, slots=8)
    big = next(t for t in range(1, 400) if manager.budget.floor_pages(t) > 8)
    assert manager.can_grow("a", big - 1) and not manager.can_grow("a", big)
    manager.grow("a", big - 1)
    assert not manager.can_grow("b", 40), "a's floor leaves too little for b"


def test_two_level_lookup_insert_remove_and_directory_growth():
    table = ResidencyTable(2, 2, 16, 4, BUCKETS, "cpu")
    table.ensure_rows(2)
    table.assign_slots([0, 1, 2], row=1)
    table.ensure_pages(8)
    table.insert(1, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), torch.tensor([5, 5, 7]))
    table.ensure_pages(100)  # the directory grows; existing entries stay reachable
    pages = torch.tensor([[[5, 7, 99, -1], [5, 7, 6, -1]]])
    found = table.lookup(torch.tensor([1]), 1, pages)
    assert found.tolist() == [[[0, -1, -1, -1], [1, 2, -1, -1]]]
    assert table.lookup(torch.tensor([1]), 0, pages).eq(-1).all()  # other layer: nothing
    assert table.segments_in_use == 2  # pages 5 and 7 share a segment per (layer, head)
    table.remove(1, torch.tensor([1]), torch.tensor([1]))
    assert table.segments_in_use == 2
    table.remove(1, torch.tensor([1]), torch.tensor([2]))
    assert table.segments_in_use == 1, "an emptied segment goes back to the pool"
    table.check({1: ([0, 1, 2], 100)})


def test_metadata_bytes_follow_the_working_set_not_max_batch_times_context():
    """The same request set with a small, then a large resident working set: the two-level
    tables grow with what is resident; a flat table is fixed by max_batch × max_context."""
    manager = _manager(cpu_pages=4096, slots=420, token_budget=400, buffer_ratio=0.0,
                       min_buffer_ratio=0.0)  # fmt: skip
    for r in range(4):
        manager.grow(f"r{r}", 4000)  # 1000 pages each
    residency = manager.residency

    def make_resident(pages_per_request: int) -> int:
        for r in range(4):
            rid = f"r{r}"
            idx = torch.tensor(manager.slots[rid][:pages_per_request])
            for layer in range(LAYERS):
                for head in range(HEADS):
                    fresh = residency.slot_page[layer, head, idx] < 0
                    slots = idx[fresh]
                    pages = torch.arange(pages_per_request)[fresh]
                    residency.insert(layer, torch.full_like(slots, head), slots, pages)
        manager.check_integrity()
        return residency.metadata_bytes

    def second_level(total: int) -> int:
        return total - residency.directory.numel() * 4

    small = make_resident(8)
    large = make_resident(100)
    assert second_level(large) > 8 * second_level(small)
    flat = 64 * LAYERS * HEADS * (131072 // PAGE) * 4  # int32 table: 64 requests × 128K tokens
    assert large < flat / 100


def test_reserve_counts_what_was_reserved_since_its_last_look_at_the_stack():
    """`reserve` reads a copy of the stack's top taken at its previous call (on CUDA, one
    that may still be on its way), less what was reserved since: after a step pops all it
    reserved, the next reserve must still grow the pool, though the copy shows a full stack."""
    table = ResidencyTable(LAYERS, HEADS, 8, 4, BUCKETS, "cpu")
    table.reserve(10)  # grows to hold 10; copies the top (>= 10) for the next call
    free = int(table.free_top)
    assert free >= 10
    table.free_top -= free  # the step's inserts pop every free segment
    table.reserve(3)
    assert int(table.free_top) >= 3  # grown, not trusted to the stale copy
    table.free_top -= 3
    table.reserve(1)
    assert int(table.free_top) >= 1


def test_masked_replace_and_touch_match_a_plain_model():
    """The decode path's fixed-shape updates (`replace` with a work mask, entries without work
    carrying garbage slots; `touch_ref`, as `spin_retrieve_ref` marks slots used) against a
    dictionary of (row, layer, head, page) -> slot, over random rounds that evict, insert and
    reuse segments; no host-side count is needed."""
    gen = torch.Generator().manual_seed(5)
    rows, slots_per_row, pages_per_row = 3, 6, 40
    table = ResidencyTable(LAYERS, HEADS, rows * slots_per_row, 4, BUCKETS, "cpu")
    table.ensure_rows(rows)
    table.ensure_pages(pages_per_row)
    owned = {r: list(range(r * slots_per_row, (r + 1) * slots_per_row)) for r in range(rows)}
    for r, slots in owned.items():
        table.assign_slots(slots, r)
    model: dict[tuple[int, int, int], dict[int, int]] = {}  # (row, layer, head) -> page -> slot
    for _ in range(25):
        layer = int(torch.randint(LAYERS, (1,), generator=gen))
        table.reserve(rows * HEADS * slots_per_row)
        heads, slots, pages, work = [], [], [], []
        for r in range(rows):
            for h in range(HEADS):
                held = model.setdefault((r, layer, h), {})
                chosen = torch.randperm(slots_per_row, generator=gen)[:4].tolist()
                for j in chosen:
                    slot = owned[r][j]
                    do = bool(torch.rand(1, generator=gen) < 0.7)
                    fresh = [p for p in range(pages_per_row) if p not in held]
                    page = fresh[int(torch.randint(len(fresh), (1,), generator=gen))]
                    heads.append(h)
                    slots.append(slot if do else -1)  # garbage where there is no work
                    pages.append(page if do else 123)
                    work.append(do)
                    if do:
                        for p, s in list(held.items()):
                            if s == slot:
                                del held[p]
                        held[page] = slot
        as_tensor = dict(dtype=torch.int64)
        table.replace(layer, torch.tensor(heads, **as_tensor), torch.tensor(slots, **as_tensor),
                      torch.tensor(pages, **as_tensor), torch.tensor(work))  # fmt: skip
        touch_ref(table.slot_bucket[layer], torch.tensor(heads, **as_tensor),
                  torch.tensor(slots, **as_tensor), torch.tensor(work), BUCKETS - 1)  # fmt: skip
        for (r, lt, h), held in model.items():
            query = torch.full((1, HEADS, pages_per_row), -1)
            query[0, h] = torch.arange(pages_per_row)
            found = table.lookup(torch.tensor([r]), lt, query)[0, h].tolist()
            assert found == [held.get(p, -1) for p in range(pages_per_row)]
        touched = [s for s, w in zip(slots, work) if w]
        assert (table.slot_bucket[layer].flatten(0)[
            torch.tensor(heads)[torch.tensor(work)] * rows * slots_per_row + torch.tensor(touched)
        ] == BUCKETS - 1).all()  # fmt: skip
        table.check({r: (s, pages_per_row) for r, s in owned.items()})
        table.age()
    assert table.segments_in_use > 0


def test_clear_slots_drops_one_owner_in_every_layer_and_head_at_once():
    """clear_slots (one batched drop over all layers) against a dictionary of
    (row, layer, head) -> page -> slot: the cleared owner's pages are gone everywhere, the other
    owner's are untouched, emptied segments are back in the pool and the count is exact."""
    gen = torch.Generator().manual_seed(11)
    layers, heads, seg, num_pages = 3, 3, 4, 20
    table = ResidencyTable(layers, heads, 12, seg, BUCKETS, "cpu")
    table.ensure_rows(2)
    table.ensure_pages(num_pages)
    owned = {0: [0, 2, 4, 6, 8, 10], 1: [1, 3, 5, 7, 9, 11]}  # interleaved slot ids
    for row, slots in owned.items():
        table.assign_slots(slots, row)
    model: dict[tuple[int, int, int], dict[int, int]] = {}  # (row, layer, head) -> page -> slot
    for row, slots in owned.items():
        for layer in range(layers):
            for head in range(heads):
                held = torch.rand(len(slots), generator=gen) < 0.7
                pages = torch.randperm(num_pages, generator=gen)[: len(slots)][held]
                chosen = torch.tensor(slots)[held]
                table.insert(layer, torch.full_like(chosen, head), chosen, pages)
                model[row, layer, head] = dict(zip(pages.tolist(), chosen.tolist()))
    table.check({r: (s, num_pages) for r, s in owned.items()})
    held_by_0 = sum(len(m) for (r, _, _), m in model.items() if r == 0)
    assert 0 < held_by_0 < len(owned[0]) * layers * heads  # some slots hold a page, some not

    cleared = table.clear_slots(owned[0])

    assert int(cleared) == held_by_0
    every_page = torch.arange(num_pages).expand(1, heads, num_pages)
    for layer in range(layers):
        for row in owned:
            found = table.lookup(torch.tensor([row]), layer, every_page)[0].tolist()
            for head in range(heads):
                held = model[row, layer, head] if row == 1 else {}
                assert found[head] == [held.get(p, -1) for p in range(num_pages)]
    table.check({1: (owned[1], num_pages)})
    live = {(lt, h, p // seg) for (r, lt, h), m in model.items() if r == 1 for p in m}
    assert table.segments_in_use == len(live), "row 0's segments went back to the pool"


class _RecordingCudart:
    """Stands in for `torch.cuda.cudart()` on a machine without CUDA: records what
    `pinned_empty` asks of the runtime (the registration itself needs a GPU)."""

    def __init__(self, register_error: int = 0):
        self.calls: list[tuple] = []
        self.register_error = register_error

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (the CUDA runtime's name)
        self.calls.append(("register", ptr, size, flags))
        return self.register_error

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0


def test_pinned_empty_registers_exactly_its_bytes_and_unregisters_when_freed(monkeypatch):
    """The CPU tier is pinned at its exact size (torch's pinned allocator would round 33.75 GiB
    up to 64), and the pages are unregistered when the tensor goes (or they stay locked)."""
    cudart = _RecordingCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    tier = pinned_empty((3, 5, 7), torch.bfloat16)
    ptr = tier.data_ptr()
    assert cudart.calls == [("register", ptr, 3 * 5 * 7 * 2, 3)]  # portable | mapped
    view = tier[1]  # a view keeps the memory (and its registration) alive
    del tier
    assert cudart.calls[-1][0] == "register"
    del view
    assert cudart.calls[-1] == ("unregister", ptr)


def test_pinned_empty_failure_reads_as_out_of_memory(monkeypatch):
    """A failed registration raises what build_tiered_cache turns into its cpu_cache_tokens
    error, and leaves nothing registered."""
    cudart = _RecordingCudart(register_error=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    with pytest.raises(RuntimeError, match="out of memory"):
        pinned_empty((4, 4), torch.float32)
    assert [c[0] for c in cudart.calls] == ["register"]
