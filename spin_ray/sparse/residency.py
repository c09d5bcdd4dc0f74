"""Which page of which request sits in which GPU-tier slot, per (tier layer, KV head).

Forward map, two levels: `directory[row, layer, head, page // SEG]` names a second-level
segment (-1: none) and `segments[seg, page % SEG]` the slot holding that page (-1: not
resident). Segments are taken from a pool on demand when a page of their range becomes
resident and go back when their last page leaves, so the metadata follows the resident working
set instead of max_batch × max_context; the directory is SEG times smaller than a flat table,
its rows are added as requests run concurrently and its length follows the longest context.
Growing reallocates tensors that CUDA graphs read (`generation`), so the engine allocates both
once at their bounds before serving (`TieredCacheManager.presize`): the pool is then bounded by
the CPU tier (pages / SEG per layer and head, twice over), not by max_batch × max_context.

Reverse map, per slot: `slot_page[layer, head, slot]` (the logical page held, -1: empty) and
`slot_bucket[layer, head, slot]` (recency: `lru_buckets - 1` = used this step, aged by one
each step, 0 = oldest). `slot_row[slot]` is the directory row of the request owning the slot
(a slot id is owned in every layer and head at once).

Free segments sit on a stack (`free_stack[:free_top]`, the top kept on the device). The decode
path updates the maps with `kernels/spin_retrieve.py` (the fused kernels, or their torch
reference, whose map updates in `kernels/residency_ref.py` this table runs too): fixed-shape
tensors with a mask of the entries that have work, no data-dependent shapes and no host
synchronisation — allocation pops the stack, emptied segments are pushed back. `reserve`
(host, once per step) makes sure the stack holds enough segments for what the step may
allocate, without waiting for the GPU in the steady state: it reads a copy of the top started
at an earlier call, less what was reserved since.
"""

from __future__ import annotations

import torch

from spin_ray.cache.page_pool import CacheIntegrityError
from spin_ray.device.step_buffers import stream_mark, to_device_async, to_host_async
from spin_ray.kernels.residency_ref import (
    add_pages_ref,
    drop_pages_ref,
    lookup_ref,
)


class ResidencyTable:
    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_slots: int,
        segment_pages: int,
        lru_buckets: int,
        device: torch.device | str,
    ):
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.segment_pages = segment_pages
        self.lru_buckets = lru_buckets
        self.device = torch.device(device)
        self.dir_len = 1  # directory entries per (row, layer, head); grows with contexts
        i32 = dict(dtype=torch.int32, device=self.device)
        self.directory = torch.full((1, num_layers, num_heads, self.dir_len), -1, **i32)
        self.segments = torch.full((1, segment_pages), -1, **i32)  # [C, SEG]
        self.seg_count = torch.zeros(1, **i32)  # [C] resident pages in each segment
        self.seg_home = torch.full((1,), -1, dtype=torch.int64, device=self.device)  # [C]
        self.free_stack = torch.zeros(1, dtype=torch.int64, device=self.device)  # [C]
        self.free_top = torch.ones(1, dtype=torch.int64, device=self.device)  # free_stack[:top]
        self.slot_page = torch.full((num_layers, num_heads, num_slots), -1, **i32)
        self.slot_bucket = torch.zeros(
            (num_layers, num_heads, num_slots), dtype=torch.uint8, device=self.device
        )
        self.slot_row = torch.full((num_slots,), -1, dtype=torch.int64, device=self.device)
        self.generation = 0
        """Bumped whenever a table is reallocated (growth): CUDA graphs that read the old
        tensors are stale."""
        self._free_bound = 0  # host: segments surely on the stack (<= free_top)
        self._top_copy: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        """A host copy of `free_top` on its way (and the event it has arrived at)."""
        self._reserved_since_copy = 0  # segments reserved after that copy was started

    # ------------------------------------------------------------------ rows and slots

    # Growth allocates with inference mode off: the engine steps under torch.inference_mode,
    # but the tables are also updated outside it (aborts), which inference tensors forbid.

    @torch.inference_mode(False)
    def ensure_rows(self, num_rows: int) -> None:
        """Make directory rows 0..num_rows-1 exist (new rows are empty)."""
        have = self.directory.shape[0]
        if num_rows > have:
            grown = max(num_rows, 2 * have)
            extra = torch.full(
                (grown - have, *self.directory.shape[1:]), -1, dtype=torch.int32, device=self.device
            )
            self.directory = torch.cat([self.directory, extra])
            self.generation += 1

    @torch.inference_mode(False)
    def ensure_pages(self, num_pages: int) -> None:
        """Make the directory reach logical page num_pages - 1 (grows by doubling)."""
        need = -(-num_pages // self.segment_pages)
        if need <= self.dir_len:
            return
        new_len = max(need, 2 * self.dir_len)
        grown = torch.full(
            (*self.directory.shape[:3], new_len), -1, dtype=torch.int32, device=self.device
        )
        grown[..., : self.dir_len] = self.directory
        live = self.seg_home >= 0
        home = self.seg_home[live]
        self.seg_home[live] = home // self.dir_len * new_len + home % self.dir_len
        self.directory, self.dir_len = grown, new_len
        self.generation += 1

    def assign_slots(self, slots: list[int], row: int) -> None:
        """Slots (empty in every layer and head) now belong to directory row `row`."""
        self.slot_row[to_device_async(torch.tensor(slots, dtype=torch.int64), self.device)] = row

    def clear_slots(self, slots: list[int]) -> torch.Tensor:
        """Drop every page held by `slots` in every layer and head and disown the slots;
        returns how many pages left the GPU tier (a 0-dim device tensor: no host sync)."""
        idx = to_device_async(torch.tensor(slots, dtype=torch.int64), self.device)  # [n]
        held = self.slot_page[:, :, idx] >= 0  # [L, H, n]
        layers = torch.arange(self.num_layers, device=self.device)
        heads = torch.arange(self.num_heads, device=self.device)
        grid = torch.meshgrid(layers, heads, idx, indexing="ij")  # 3 x [L, H, n]
        self.drop(*(g.flatten() for g in grid), held.flatten())  # one batch over all layers
        self.slot_row[idx] = -1
        return held.sum()

    # ------------------------------------------------------------------ lookups

    def lookup(
        self,
        rows: torch.Tensor,  # [B] int64
        layer: int,
        pages: torch.Tensor,  # [B, H, K] int64, -1 = none
    ) -> torch.Tensor:  # [B, H, K] int64 slot ids, -1 = not resident
        return lookup_ref(self.directory, self.segments, rows, layer, pages)

    def _dir_index(
        self,
        layer: int | torch.Tensor,  # int, or [M] int64: each entry's layer
        heads: torch.Tensor,  # [M] int64
        slots: torch.Tensor,  # [M] int64
        pages: torch.Tensor,  # [M] int64
    ) -> torch.Tensor:  # [M] int64
        """Flat directory index of each (owner row of slot, layer, head, page's segment)."""
        rows = self.slot_row[slots]
        return (
            (rows * self.num_layers + layer) * self.num_heads + heads
        ) * self.dir_len + pages // self.segment_pages

    # ------------------------------------------------------------------ updates

    def insert(
        self,
        layer: int,
        heads: torch.Tensor,  # [M] int64
        slots: torch.Tensor,  # [M] int64  empty slots (in this layer and head)
        pages: torch.Tensor,  # [M] int64  logical pages of the slot's owner
    ) -> None:
        """Record that `slots` now hold `pages` (host-side use: reserves segments first)."""
        self.reserve(torch.unique(self._dir_index(layer, heads, slots, pages)).numel())
        self.replace(layer, heads, slots, pages, torch.ones_like(slots, dtype=torch.bool))

    def remove(
        self,
        layer: int,
        heads: torch.Tensor,  # [M] int64
        slots: torch.Tensor,  # [M] int64  slots holding a page (in this layer and head)
    ) -> None:
        """Empty `slots`: their pages are no longer resident."""
        self.drop(layer, heads, slots, torch.ones_like(slots, dtype=torch.bool))

    def replace(
        self,
        layer: int,
        heads: torch.Tensor,  # [M] int64
        slots: torch.Tensor,  # [M] int64  (any value where ~work)
        pages: torch.Tensor,  # [M] int64  pages of the slots' owner, not resident in this head
        work: torch.Tensor,  # [M] bool  entries to apply; their slots are distinct
    ) -> None:
        """Where `work`: drop whatever the slot holds, then record that it holds the page.
        Fixed shapes, no host synchronisation; `reserve` must cover the segments allocated."""
        slots = torch.where(work, slots, 0)
        self.drop(layer, heads, slots, work)
        self._add(layer, heads, slots, pages, work)

    def age(self) -> None:
        """One step passes: every bucket moves one toward the oldest (0)."""
        self.slot_bucket.sub_((self.slot_bucket > 0).to(torch.uint8))

    def drop(
        self,
        layer: int | torch.Tensor,  # int, or [M] int64: each entry's layer
        heads: torch.Tensor,  # [M] int64
        slots: torch.Tensor,  # [M] int64  (any value where ~work)
        work: torch.Tensor,  # [M] bool
    ) -> None:
        """Empty the slots (where `work` and they hold a page; fixed shapes, no host sync);
        emptied segments go back on the free stack. With a layer per entry, one call covers
        entries of many layers (their (layer, head, slot)s distinct)."""
        slots = torch.where(work, slots, 0)
        at = (layer * self.num_heads + heads) * self.slot_page.shape[2] + slots  # [M]
        drop_pages_ref(*self._maps(self.slot_page), at, self.slot_row[slots], layer, heads, work)

    def _add(self, layer, heads, slots, pages, work) -> None:
        """Record `pages` in the (empty) slots where `work`, taking segments off the stack."""
        at = heads * self.slot_page.shape[2] + slots  # [M] in this layer's [H * Q]
        maps = self._maps(self.slot_page[layer])
        add_pages_ref(*maps, at, self.slot_row[slots], layer, heads, slots, pages, work)

    def _maps(self, slot_page: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The forward map and free stack, then `slot_page` flat (`spin_retrieve`'s order)."""
        return (self.directory, self.segments, self.seg_count, self.seg_home, self.free_stack,
                self.free_top, slot_page.view(-1))  # fmt: skip

    def reserve(self, num_segments: int) -> None:
        """Make the free stack hold at least `num_segments` segments for the work launched
        until the next call (call once per step, not per layer). The host keeps a lower bound
        of the stack's top: a copy of the top started at an earlier call, once it has arrived,
        less every segment reserved since (what that work may have popped). Only when the
        bound falls short does it wait for the GPU to read the top itself (and grow the pool
        if that is short too) — with async scheduling the previous step is still running."""
        if self._top_copy is not None and _passed(self._top_copy[1]):
            self._free_bound = int(self._top_copy[0]) - self._reserved_since_copy
            self._top_copy = None
        if self._free_bound < num_segments:
            self._free_bound = free = int(self.free_top)  # waits for the GPU
            self._top_copy = None
            if free < num_segments:
                self._grow_segments(max(num_segments - free, self.seg_home.numel()))
                self._free_bound = int(self.free_top)
        if self._top_copy is None:  # the top as of the work launched so far
            self._top_copy = to_host_async(self.free_top), stream_mark(self.free_top)
            self._reserved_since_copy = 0
        self._free_bound -= num_segments
        self._reserved_since_copy += num_segments

    @torch.inference_mode(False)
    def _grow_segments(self, extra: int) -> None:
        self.segments = torch.cat(
            [self.segments, self.segments.new_full((extra, self.segment_pages), -1)]
        )
        self.seg_count = torch.cat([self.seg_count, self.seg_count.new_zeros(extra)])
        self.seg_home = torch.cat([self.seg_home, self.seg_home.new_full((extra,), -1)])
        free = (self.seg_home < 0).nonzero().flatten()
        self.free_stack = torch.zeros_like(self.seg_home)
        self.free_stack[: free.numel()] = free
        self.free_top = torch.tensor([free.numel()], dtype=torch.int64, device=self.device)
        self.generation += 1

    # ------------------------------------------------------------------ accounting

    @property
    def segments_in_use(self) -> int:
        return int((self.seg_home >= 0).sum())

    @property
    def metadata_bytes(self) -> int:
        """Bytes of the forward map: directory plus the segment pool (segments, counts, homes,
        free-stack entries)."""
        per_segment = self.segments.shape[1] * 4 + 4 + 8 + 8
        return self.directory.numel() * 4 + self.seg_home.numel() * per_segment

    def check(self, owned: dict[int, tuple[list[int], int]]) -> None:
        """Raise `CacheIntegrityError` unless forward and reverse maps agree: `owned` maps each
        live directory row to (its slots, its number of pages)."""
        owner_row = torch.full_like(self.slot_row, -1)
        max_page = torch.zeros_like(self.slot_row)
        for row, (slots, num_pages) in owned.items():
            idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
            owner_row[idx] = row
            max_page[idx] = num_pages
        if not torch.equal(owner_row, self.slot_row):
            raise CacheIntegrityError("slot ownership disagrees with the residency table")
        held = self.slot_page >= 0  # [L, H, Q]
        if (held & (self.slot_row < 0)).any():
            raise CacheIntegrityError("a slot owned by nobody holds a page")
        layer, head, slot = held.nonzero(as_tuple=True)
        pages = self.slot_page[layer, head, slot].long()
        if (pages >= max_page[slot]).any():
            raise CacheIntegrityError("a slot holds a page beyond its request's context")
        for lt in range(self.num_layers):
            here = layer == lt
            found = self.lookup_flat(lt, head[here], slot[here], pages[here])
            if not torch.equal(found, slot[here]):
                raise CacheIntegrityError("forward page table disagrees with slot contents")
        if int(self.seg_count.sum()) != int(held.sum()):
            raise CacheIntegrityError("segment counts disagree with resident pages")
        live = self.seg_home >= 0
        if (self.seg_count[~live] != 0).any() or (self.seg_count[live] <= 0).any():
            raise CacheIntegrityError("a segment is empty but allocated, or used but free")
        if int((self.directory >= 0).sum()) != int(live.sum()):
            raise CacheIntegrityError("directory entries disagree with allocated segments")
        stacked = self.free_stack[: int(self.free_top)]
        if not torch.equal(stacked.sort().values, (~live).nonzero().flatten()):
            raise CacheIntegrityError("the free-segment stack disagrees with the free segments")

    def lookup_flat(self, layer, heads, slots, pages) -> torch.Tensor:  # [M] int64
        """Slot the forward map gives for (owner of slot, layer, head, page)."""
        seg = self.directory.view(-1)[self._dir_index(layer, heads, slots, pages)].long()
        return torch.where(
            seg >= 0, self.segments[seg.clamp(min=0), pages % self.segment_pages].long(), -1
        )


def _passed(event: torch.cuda.Event | None) -> bool:
    return event is None or event.query()
