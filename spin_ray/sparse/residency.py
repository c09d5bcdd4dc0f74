"""Which page of which request sits in which GPU-tier slot, per (tier layer, KV head).

Forward map, two levels: `directory[row, layer, head, page // SEG]` names a second-level
segment (-1: none) and `segments[seg, page % SEG]` the slot holding that page (-1: not
resident). Segments are taken from a pool on demand when a page of their range becomes
resident and go back when their last page leaves, so the metadata follows the resident working
set instead of max_batch × max_context; the directory is SEG times smaller than a flat table,
its rows are added as requests run concurrently and its length follows the longest context.

Reverse map, per slot: `slot_page[layer, head, slot]` (the logical page held, -1: empty) and
`slot_bucket[layer, head, slot]` (recency: `lru_buckets - 1` = used this step, aged by one
each step, 0 = oldest). `slot_row[slot]` is the directory row of the request owning the slot
(a slot id is owned in every layer and head at once).
"""

from __future__ import annotations

import torch

from spin_ray.cache.page_pool import CacheIntegrityError


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
        self.slot_page = torch.full((num_layers, num_heads, num_slots), -1, **i32)
        self.slot_bucket = torch.zeros(
            (num_layers, num_heads, num_slots), dtype=torch.uint8, device=self.device
        )
        self.slot_row = torch.full((num_slots,), -1, dtype=torch.int64, device=self.device)

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

    def assign_slots(self, slots: list[int], row: int) -> None:
        """Slots (empty in every layer and head) now belong to directory row `row`."""
        self.slot_row[torch.tensor(slots, dtype=torch.int64, device=self.device)] = row

    def clear_slots(self, slots: list[int]) -> int:
        """Drop every page held by `slots` in every layer and head and disown the slots;
        returns how many pages left the GPU tier."""
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        held = self.slot_page[:, :, idx] >= 0  # [L, H, n]
        layer, head, j = held.nonzero(as_tuple=True)
        for lt in range(self.num_layers):
            here = layer == lt
            if here.any():
                self.remove(lt, head[here], idx[j[here]])
        self.slot_row[idx] = -1
        return int(held.sum())

    # ------------------------------------------------------------------ lookups

    def lookup(
        self,
        rows: torch.Tensor,  # [B] int64
        layer: int,
        pages: torch.Tensor,  # [B, H, K] int64, -1 = none
    ) -> torch.Tensor:  # [B, H, K] int64 slot ids, -1 = not resident
        b, h, k = pages.shape
        heads = torch.arange(h, device=self.device)[None, :, None]
        safe = pages.clamp(min=0)
        seg = self.directory[rows[:, None, None], layer, heads, safe // self.segment_pages]
        slot = self.segments[seg.clamp(min=0).long(), safe % self.segment_pages].long()
        return torch.where((pages >= 0) & (seg >= 0), slot, -1)

    def _dir_index(self, layer: int, heads: torch.Tensor, slots: torch.Tensor, pages: torch.Tensor):
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
        """Record that `slots` now hold `pages`."""
        if slots.numel() == 0:
            return
        flat = self._dir_index(layer, heads, slots, pages)
        directory = self.directory.view(-1)
        missing = torch.unique(flat[directory[flat] < 0])
        if missing.numel():
            new = self._take_segments(missing.numel())
            directory[missing] = new.int()
            self.seg_home[new] = missing
        seg = directory[flat].long()
        self.segments[seg, pages % self.segment_pages] = slots.int()
        self.seg_count.index_add_(0, seg, torch.ones_like(seg, dtype=torch.int32))
        self.slot_page[layer, heads, slots] = pages.int()

    def remove(
        self,
        layer: int,
        heads: torch.Tensor,  # [M] int64
        slots: torch.Tensor,  # [M] int64  slots holding a page (in this layer and head)
    ) -> None:
        """Empty `slots`: their pages are no longer resident."""
        if slots.numel() == 0:
            return
        pages = self.slot_page[layer, heads, slots].long()
        flat = self._dir_index(layer, heads, slots, pages)
        directory = self.directory.view(-1)
        seg = directory[flat].long()
        self.segments[seg, pages % self.segment_pages] = -1
        self.seg_count.index_add_(0, seg, torch.full_like(seg, -1, dtype=torch.int32))
        emptied = torch.unique(seg[self.seg_count[seg] == 0])
        directory[self.seg_home[emptied]] = -1
        self.seg_home[emptied] = -1
        self.slot_page[layer, heads, slots] = -1

    def touch(self, layer: int, heads: torch.Tensor, slots: torch.Tensor) -> None:
        """Mark `slots` used this step (newest bucket)."""
        self.slot_bucket[layer, heads, slots] = self.lru_buckets - 1

    def age(self) -> None:
        """One step passes: every bucket moves one toward the oldest (0)."""
        self.slot_bucket.sub_((self.slot_bucket > 0).to(torch.uint8))

    def _take_segments(self, n: int) -> torch.Tensor:  # [n] int64
        free = (self.seg_home < 0).nonzero().flatten()
        if free.numel() < n:
            self._grow_segments(n - free.numel())
            free = (self.seg_home < 0).nonzero().flatten()
        new = free[:n]
        self.segments[new] = -1
        self.seg_count[new] = 0
        return new

    @torch.inference_mode(False)
    def _grow_segments(self, missing: int) -> None:
        have = self.seg_home.numel()
        extra = max(have, missing)  # at least double
        self.segments = torch.cat(
            [self.segments, self.segments.new_full((extra, self.segment_pages), -1)]
        )
        self.seg_count = torch.cat([self.seg_count, self.seg_count.new_zeros(extra)])
        self.seg_home = torch.cat([self.seg_home, self.seg_home.new_full((extra,), -1)])

    # ------------------------------------------------------------------ accounting

    @property
    def resident_pages(self) -> int:
        return int((self.slot_page >= 0).sum())

    @property
    def segments_in_use(self) -> int:
        return int((self.seg_home >= 0).sum())

    @property
    def metadata_bytes(self) -> int:
        """Bytes of the forward map: directory plus the segment pool (segments, counts, homes)."""
        per_segment = self.segments.shape[1] * 4 + 4 + 8
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

    def lookup_flat(self, layer, heads, slots, pages) -> torch.Tensor:  # [M] int64
        """Slot the forward map gives for (owner of slot, layer, head, page)."""
        seg = self.directory.view(-1)[self._dir_index(layer, heads, slots, pages)].long()
        return torch.where(
            seg >= 0, self.segments[seg.clamp(min=0), pages % self.segment_pages].long(), -1
        )
