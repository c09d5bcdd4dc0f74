"""The scheduler's view of the two-tier KV cache, with the same ask-then-act methods as
`PageTables` (`can_grow` / `grow` / `release` / `table` / `check_integrity`).

Every request holds (1) CPU-tier pages for its whole context — the engine's page ids — and
(2) GPU-tier slots for its working set: each slot holds one page of every offloaded layer and
KV head. A request running at context T needs `floor(T)` slots (its mandatory pages plus the
buffer floor) and grows toward `target(T)` (mandatory × (1 + buffer_ratio)) while slots are
free. When a request needs slots and none are free, the buffers of others shrink toward their
floor, the one with the largest excess first, dropping their least recently used pages; a
request is never left below its floor. If the CPU tier or the floors cannot be met `can_grow`
says no and the scheduler queues or preempts.

A request in prefill may also hold (3) prefill slots, one per page of its prompt
(`hold_prefill`), taken from free slots and others' buffer excess when there are enough: its
chunks keep their K/V there, so each later chunk reads its prefix from HBM instead of reading
the whole prefix back over PCIe (quadratic in the prompt length). They go back when its first
decode step is planned (`end_prefill`) or it is released.
"""

from __future__ import annotations

import torch

from spin_ray.cache.page_pool import CacheIntegrityError, PagePool
from spin_ray.device.step_buffers import bucket
from spin_ray.kernels.lru_victims import lru_keys_ref, lru_num_keys, lru_victims_ref
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.residency import ResidencyTable
from spin_ray.sparse.stats import KVCounters


class TieredCacheManager:
    def __init__(
        self,
        num_cpu_pages: int,
        num_gpu_slots: int,
        budget: PageBudget,
        residency: ResidencyTable,
        counters: KVCounters,
    ):
        self.pool = PagePool(num_cpu_pages)
        self.slot_pool = PagePool(num_gpu_slots)
        self.page_size = budget.page_size
        self.budget = budget
        self.residency = residency
        self.counters = counters
        self.tables: dict[str, list[int]] = {}
        self.slots: dict[str, list[int]] = {}
        self.prefill_slots: dict[str, list[int]] = {}
        """Slots holding the prompt pages of requests in prefill, page i in slot [i]."""
        self.rows: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self._free_rows: list[int] = []
        self.slot_width = 1
        """The least width of slot lists (`slot_lists`); `presize` sets it to the most slots a
        request can hold, so decode steps keep one shape (one CUDA graph) while buffers grow
        and shrink."""
        self._slot_table = torch.full((1, 1), -1, dtype=torch.int64, device=residency.device)
        """[rows, width] each directory row's slots in `slots` order, -1 padded: the device
        copy of `slots`, kept in step when slots are given or taken, so a step's slot lists
        are one gather."""

    # ------------------------------------------------------------------ PageTables interface

    def presize(self, max_num_seqs: int, max_model_len: int, retrievals: int = 1) -> None:
        """Allocate the residency tables once, before serving, at sizes serving cannot exceed:
        growing them later reallocates tensors CUDA graphs read (`ResidencyTable.generation`),
        so every graph would be recaptured in the middle of traffic. Directory: max_num_seqs
        rows of max_model_len tokens. Segments (each covers `segment_pages` pages of one
        request's table in one tier layer and KV head): the live ones are at most the CPU
        tier's pages / segment_pages + one partial per request, per (layer, head), and a step
        reserves at most as many again per retrieval of a layer (`retrievals`: 2 with
        lookahead). For Llama-3.1-8B, 64 requests of 128K tokens and a 512K-token CPU tier: a
        31 MB directory and 85 MB of segments (one retrieval per layer). Slot lists: as wide as
        the most slots a request can hold (its buffer target at max_model_len)."""
        target = self.budget.target_pages(max_model_len)
        self.slot_width = bucket(min(target, self.slot_pool.num_pages))
        self._fit_slot_table(1, self.slot_width)
        residency = self.residency
        residency.ensure_rows(max_num_seqs)
        residency.ensure_pages(self.pages_for(max_model_len))
        bound = -(-self.pool.num_pages // residency.segment_pages) + max_num_seqs
        per_head = (1 + retrievals) * bound
        residency.reserve(residency.num_layers * residency.num_heads * per_head)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def extra_pages(self, request_id: str, num_tokens: int) -> int:
        return max(0, self.pages_for(num_tokens) - len(self.tables.get(request_id, ())))

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        if not self.pool.can_allocate(self.extra_pages(request_id, num_tokens)):
            return False
        need = self.budget.floor_pages(num_tokens) - len(self.slots.get(request_id, ()))
        free = self.slot_pool.num_free  # enough free slots: skip the O(requests) reclaim sum
        return need <= free or need <= free + self._reclaimable(request_id)

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Cover `num_tokens` tokens in the CPU tier and give the request at least its slot
        floor (ask `can_grow` first), then top its buffer up from free slots."""
        if not self.can_grow(request_id, num_tokens):
            raise RuntimeError(f"cannot grow {request_id!r} to {num_tokens} tokens")
        extra = self.extra_pages(request_id, num_tokens)
        table = self.tables.setdefault(request_id, [])
        if extra:
            table.extend(self.pool.allocate(extra, request_id))
        if request_id not in self.rows:
            self.rows[request_id] = self._take_row()
            self.slots[request_id] = []
        self.tokens[request_id] = max(self.tokens.get(request_id, 0), num_tokens)
        self.residency.ensure_pages(len(table))
        held = len(self.slots[request_id])
        need = self.budget.floor_pages(num_tokens) - held
        if need > self.slot_pool.num_free:
            self._reclaim(need - self.slot_pool.num_free, request_id)
        want = self.budget.target_pages(num_tokens) - held  # >= need: target >= floor
        self._give_slots(request_id, min(want, self.slot_pool.num_free))

    def release(self, request_id: str) -> None:
        """Give back every page and slot of `request_id` (no-op if it holds none)."""
        pages = self.tables.pop(request_id, None)
        if pages:
            self.pool.free(pages, request_id)
        self.end_prefill(request_id)
        slots = self.slots.pop(request_id, None)
        if slots:
            self.residency.clear_slots(slots)
            self.slot_pool.free(slots, request_id)
        row = self.rows.pop(request_id, None)
        if row is not None:
            self._slot_table[row] = -1
            self._free_rows.append(row)
        self.tokens.pop(request_id, None)

    def table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def check_integrity(self) -> None:
        """No leaked or double-owned page in either tier; residency maps consistent."""
        self.pool.check_integrity(self.tables)
        prefill = {_prefill_owner(rid): slots for rid, slots in self.prefill_slots.items()}
        self.slot_pool.check_integrity({**self.slots, **prefill})
        if set(self.prefill_slots) - set(self.tables):
            raise CacheIntegrityError("prefill slots held by a request without pages")
        if set(self.slots) != set(self.rows):
            raise CacheIntegrityError("a request holds slots without a directory row or back")
        if len(set(self.rows.values())) != len(self.rows):
            raise CacheIntegrityError("two requests share a directory row")
        owned = {
            self.rows[rid]: (slots, len(self.tables.get(rid, ())))
            for rid, slots in self.slots.items()
        }
        self.residency.check(owned)
        held_by_row = {row: self.slots[rid] for rid, row in self.rows.items()}
        for row, lists in enumerate(self._slot_table.tolist()):
            held = held_by_row.get(row, [])
            if lists != held + [-1] * (len(lists) - len(held)):
                raise CacheIntegrityError(f"directory row {row}: slot table differs from slots")

    # ------------------------------------------------------------------ prefill slots

    def hold_prefill(self, request_id: str) -> list[int] | None:
        """Slots for every page of the request's context (its prompt), one per page in page
        order — taken once, at its first chunk — or None when free slots and others' buffer
        excess cannot cover them (its chunks then read their prefix from the CPU tier). Asking
        again returns the same slots, sized for the context at the first ask: the scheduler
        covers a prompt whole at admission, so it does not grow while it prefills, and a chunk
        past the held pages reads its prefix from the CPU tier."""
        held = self.prefill_slots.get(request_id)
        if held is not None:
            return held
        need = self.pages_for(self.tokens[request_id])
        free = self.slot_pool.num_free
        if need > free + self._reclaimable(request_id):
            return None
        if need > free:
            self._reclaim(need - free, request_id)
        held = self.slot_pool.allocate(need, _prefill_owner(request_id))
        self.prefill_slots[request_id] = held
        return held

    def end_prefill(self, request_id: str) -> None:
        """Give back the request's prefill slots (no-op if it holds none)."""
        held = self.prefill_slots.pop(request_id, None)
        if held:
            self.slot_pool.free(held, _prefill_owner(request_id))

    # ------------------------------------------------------------------ slots

    def slot_lists(
        self,
        request_ids: tuple[str, ...],
        rows: torch.Tensor,  # [B + P] int64 their directory rows, then P padding rows (any)
    ) -> torch.Tensor:  # [B + P, n] int64 on the device
        """Each request's slot ids, padded with -1 to a power-of-two width n, at least
        `slot_width` (steps share shapes), then a row of -1 for each padding row."""
        longest = max(len(self.slots[rid]) for rid in request_ids)
        width = max(self.slot_width, bucket(max(1, longest)))
        lists = self._slot_table[rows, :width]  # [B + P, n]
        lists[len(request_ids) :] = -1
        return lists

    def _give_slots(self, request_id: str, n: int) -> None:
        if n <= 0:
            return
        new = self.slot_pool.allocate(n, request_id)
        row = self.rows[request_id]
        self.residency.assign_slots(new, row)
        held = self.slots[request_id]
        self._fit_slot_table(row + 1, len(held) + n)
        self._slot_table[row, len(held) : len(held) + n] = torch.tensor(new, dtype=torch.int64)
        held.extend(new)

    @torch.inference_mode(False)  # a normal tensor: release (abort) writes it outside steps
    def _fit_slot_table(self, rows: int, width: int) -> None:
        """Grow the slot table (by doubling) to at least rows x width (a power of two)."""
        have_rows, have_width = self._slot_table.shape
        if rows <= have_rows and width <= have_width:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        grown = self._slot_table.new_full((new_rows, bucket(max(width, have_width))), -1)
        grown[:have_rows, :have_width] = self._slot_table
        self._slot_table = grown

    @property
    def num_buffer_slots(self) -> int:
        """Slots requests hold beyond what their next decode step attends (the reuse
        buffer); the rest of the used slots are those steps' pages and prefill slots."""
        return sum(
            max(0, len(slots) - self.budget.mandatory_pages(self.tokens[rid]))
            for rid, slots in self.slots.items()
        )

    def _excess(self, request_id: str) -> int:
        return len(self.slots[request_id]) - self.budget.floor_pages(self.tokens[request_id])

    def _reclaimable(self, exclude: str) -> int:
        return sum(max(0, self._excess(rid)) for rid in self.slots if rid != exclude)

    def _reclaim(self, n: int, exclude: str) -> None:
        """Free n slots by shrinking other requests' buffers, largest excess first."""
        while n > 0:
            rid = max((r for r in self.slots if r != exclude), key=self._excess)
            take = min(n, self._excess(rid))
            assert take > 0, "reclaim beyond what can_grow promised"
            self._shrink(rid, take)
            n -= take

    def _shrink(self, request_id: str, n: int) -> None:
        """Give back n of the request's slots: empty ones first, then those whose most recent
        use (over all layers and heads) is oldest — the buffer's eviction policy
        (`kernels/lru_victims.py`) over each slot's newest key."""
        slots = self.slots[request_id]
        idx = torch.tensor(slots, dtype=torch.int64, device=self.residency.device)
        residency = self.residency
        keys = lru_keys_ref(residency.slot_page[:, :, idx], residency.slot_bucket[:, :, idx])
        keys = keys.flatten(0, 1).amax(0)  # [n] a slot's newest use; 0 = empty everywhere
        need = torch.tensor([n], device=idx.device)
        victims = lru_victims_ref(keys[None], need, lru_num_keys(residency.lru_buckets))[0]
        gone = idx[victims].tolist()
        self.counters.add_evictions(self.residency.clear_slots(gone))
        self.slot_pool.free(gone, request_id)
        kept = set(slots) - set(gone)
        self.slots[request_id] = [s for s in slots if s in kept]
        row = self._slot_table[self.rows[request_id]]
        row.fill_(-1)
        row[: len(kept)] = torch.tensor(self.slots[request_id], dtype=torch.int64)

    def _take_row(self) -> int:
        if self._free_rows:
            return self._free_rows.pop()
        row = len(self.rows)
        self.residency.ensure_rows(row + 1)
        self._fit_slot_table(row + 1, 1)
        return row


def _prefill_owner(request_id: str) -> tuple[str, str]:
    """The slot pool's owner key of a request's prefill slots (its buffer slots: the id)."""
    return ("prefill", request_id)
