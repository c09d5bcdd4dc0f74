"""The residency maps' updates in torch operations (`sparse/residency.py` describes the maps):
look pages up, empty slots, record pages in slots, mark slots used — each on fixed-shape
tensors with a mask of the entries that have work, no data-dependent shapes and no host
synchronisation (allocation pops the free-segment stack, emptied segments are pushed back).
They are the reference of the map updates the fused retrieval kernels do
(`spin_retrieve_ref` composes them) and what `ResidencyTable` runs on any device.
"""

from __future__ import annotations

import torch


def lookup_ref(
    directory: torch.Tensor,  # [R, L, H, DL] int32
    segments: torch.Tensor,  # [C, SEG] int32
    rows: torch.Tensor,  # [B] int64
    layer: int,
    pages: torch.Tensor,  # [B, H, K] int64, -1 = none
) -> torch.Tensor:  # [B, H, K] int64 slot ids, -1 = not resident
    """The slot holding each page of (row, layer, head), through the two-level map."""
    h, seg_pages = pages.shape[1], segments.shape[1]
    heads = torch.arange(h, device=pages.device)[None, :, None]
    safe = pages.clamp(min=0)
    seg = directory[rows[:, None, None], layer, heads, safe // seg_pages]
    slot = segments[seg.clamp(min=0).long(), safe % seg_pages].long()
    return torch.where((pages >= 0) & (seg >= 0), slot, -1)


def drop_pages_ref(
    directory: torch.Tensor,  # [R, L, H, DL] int32
    segments: torch.Tensor,  # [C, SEG] int32
    seg_count: torch.Tensor,  # [C] int32
    seg_home: torch.Tensor,  # [C] int64
    free_stack: torch.Tensor,  # [C] int64
    free_top: torch.Tensor,  # [1] int64
    slot_page: torch.Tensor,  # flat view of slot contents (int32), indexed by `at`
    at: torch.Tensor,  # [M] int64 each entry's slot in `slot_page` (any value where ~work)
    rows: torch.Tensor,  # [M] int64 directory row of each slot's owner
    layer: int | torch.Tensor,  # int, or [M] int64: each entry's layer
    heads: torch.Tensor,  # [M] int64
    work: torch.Tensor,  # [M] bool; the (layer, head, slot)s where True are distinct
) -> None:
    """Empty the slots (where `work` and they hold a page); segments emptied go back on the
    free stack. Fixed shapes, no host synchronisation."""
    dir_len, seg_pages = directory.shape[3], segments.shape[1]
    old = slot_page[at].long()
    gone = work & (old >= 0)
    old = old.clamp(min=0)
    base = ((rows * directory.shape[1] + layer) * directory.shape[2] + heads) * dir_len
    flat = torch.where(gone, base + old // seg_pages, 0)
    dir_flat = directory.view(-1)
    seg = dir_flat[flat].long().clamp(min=0)  # [M] meaningful where gone
    minus = torch.full_like(old, -1)
    masked_set_ref(segments.view(-1), seg * seg_pages + old % seg_pages, minus, gone)
    seg_count.index_add_(0, seg, -gone.to(torch.int32))
    emptied = _first_of(seg, gone & (seg_count[seg] == 0), seg_home.numel())
    masked_set_ref(dir_flat, seg_home[seg].clamp(min=0), minus, emptied)
    masked_set_ref(seg_home, seg, minus, emptied)
    rank = emptied.long().cumsum(0) - 1
    masked_set_ref(free_stack, free_top + rank, seg, emptied)
    free_top += emptied.sum()
    masked_set_ref(slot_page, at, minus, gone)


def add_pages_ref(
    directory: torch.Tensor,  # [R, L, H, DL] int32
    segments: torch.Tensor,  # [C, SEG] int32
    seg_count: torch.Tensor,  # [C] int32
    seg_home: torch.Tensor,  # [C] int64
    free_stack: torch.Tensor,  # [C] int64
    free_top: torch.Tensor,  # [1] int64 (enough segments for the entries' new ones)
    slot_page: torch.Tensor,  # flat view of this layer's slot contents (int32), by `at`
    at: torch.Tensor,  # [M] int64 each entry's slot in `slot_page` (any value where ~work)
    rows: torch.Tensor,  # [M] int64 directory row of each slot's owner
    layer: int,
    heads: torch.Tensor,  # [M] int64
    slots: torch.Tensor,  # [M] int64 empty slots (any value where ~work)
    pages: torch.Tensor,  # [M] int64 logical pages of the slots' owner, not resident
    work: torch.Tensor,  # [M] bool; the slots where True are distinct
) -> None:
    """Record that the slots hold the pages (where `work`), taking a segment off the free
    stack for each directory entry still empty. Fixed shapes, no host synchronisation."""
    num_layers, num_heads, dir_len = directory.shape[1:]
    seg_pages = segments.shape[1]
    pages = pages.clamp(min=0)
    rows = rows.clamp(min=0)
    seg_no = pages // seg_pages
    entry = ((rows * num_layers + layer) * num_heads + heads) * dir_len + seg_no
    flat = torch.where(work, entry, 0)
    dir_flat = directory.view(-1)
    seg = dir_flat[flat].long()  # [M]
    need = work & (seg < 0)
    # one new segment per distinct (row, head, segment number) of this layer
    local = (rows * num_heads + heads) * dir_len + seg_no
    size = directory.shape[0] * num_heads * dir_len
    first = _first_index(local, need, size)  # [M] entry that allocates for this one
    win = need & (first == torch.arange(first.numel(), device=first.device))
    rank = win.long().cumsum(0) - 1
    new = free_stack[(free_top - 1 - rank).clamp(min=0)]  # [M] meaningful at win
    free_top -= win.sum()
    masked_set_ref(dir_flat, flat, new, win)
    masked_set_ref(seg_home, torch.where(win, new, 0), flat, win)
    seg = torch.where(need, new[first.clamp(min=0)], seg).clamp(min=0)
    masked_set_ref(segments.view(-1), seg * seg_pages + pages % seg_pages, slots, work)
    seg_count.index_add_(0, seg, work.to(torch.int32))
    masked_set_ref(slot_page, at, pages, work)


def touch_ref(
    slot_bucket: torch.Tensor,  # [H, Q] uint8 this layer's recency
    heads: torch.Tensor,  # [M] int64
    slots: torch.Tensor,  # [M] int64 (any value where ~work)
    work: torch.Tensor,  # [M] bool; the (head, slot)s where True are distinct
    newest_bucket: int,
) -> None:
    """Mark the slots used this step (the newest bucket) where `work`."""
    flat = heads * slot_bucket.shape[1] + torch.where(work, slots, 0)
    masked_set_ref(slot_bucket.view(-1), flat, torch.full_like(flat, newest_bucket), work)


def masked_set_ref(
    flat: torch.Tensor,  # [N] a flat table (view), any dtype
    index: torch.Tensor,  # [M] int64 (any value where ~work)
    values: torch.Tensor,  # [M]
    work: torch.Tensor,  # [M] bool; the indices where True are distinct
) -> None:
    """flat[index[i]] = values[i] for every i with work[i], with fixed shapes and no host
    synchronisation: every entry adds (new - old) to its element, entries without work add 0 to
    element 0 (integer tables: exact, also when uint8 wraps around)."""
    idx = torch.where(work, index, 0)
    delta = torch.where(work, values.to(flat.dtype) - flat[idx], 0).to(flat.dtype)
    flat.index_add_(0, idx, delta)


def _first_index(
    key: torch.Tensor,  # [M] int64 in [0, size) where mask
    mask: torch.Tensor,  # [M] bool
    size: int,
) -> torch.Tensor:  # [M] int64: lowest entry with mask and the same key; -1 where ~mask
    ids = torch.arange(key.numel(), device=key.device)
    claim = torch.full((size + 1,), key.numel(), dtype=torch.int64, device=key.device)
    slot = torch.where(mask, key, size)  # size: a spare element for the entries without work
    claim.scatter_reduce_(0, slot, ids, "amin")
    return torch.where(mask, claim[slot], -1)


def _first_of(key: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:  # [M] bool
    """One entry per distinct key among the masked ones (the lowest index)."""
    return mask & (_first_index(key, mask, size) == torch.arange(key.numel(), device=key.device))
