"""Fused HBM-buffer retrieval of one layer: lookup, bucketed-LRU victims, miss/victim pairing
and the residency update, one program per (sequence, KV head) row, two launches in all.

Row work is independent: a row's pages, slots, directory entries and segments belong to one
(request, layer, head) and no other row touches them. The only shared state is the stack of
free residency segments, taken and given with atomics; freeing (launch 1) and taking (launch 2)
are separate launches, so a segment given back is always written before anyone takes it.

Launch 1 (`_lookup_evict_kernel`), per row: look the K selected pages up in the two-level map
(directory -> segment -> slot); mark the hits' slots newest; key the request's n slots for the
LRU (0 empty, 1 + bucket, padding protected: since `age` ran this step, only this step's hits
hold the newest bucket, so they key above every other slot of the request and, as a request
holds at least as many slots as it selects pages, are never victims); take as many victims as
there are misses with the histogram (smallest keys, lowest index first); pair the r-th miss
with the r-th victim (through a per-row scratch list); forget the pages the victims held
(segments emptied go back on the stack); count lookups, hits, evictions and fetched bytes.
Launch 2 (`_insert_touch_kernel`), per row: record each miss's page in its victim slot (a
segment off the stack for each directory entry still empty: the first miss of an entry claims
it with a compare-and-swap, the others read the segment it took); mark the misses' slots newest.

Every per-row structure is a vector of K or N entries (no K x N or K x K matrices), so rows of
thousands of candidate slots fit one program. A row's candidate count picks its vector width at
run time (1/16, 1/4 or all of N's register block), so one compiled kernel and one CUDA graph
serve lists padded to a fixed width while each row costs about its own slots.

The eviction policy (keys and victims) is `lru_victims.py`'s, shared with its torch half.
Reference: `spin_retrieve_ref` below, in torch operations (same pairing, same victims, the same
map updates: `residency_ref.py`'s, which `ResidencyTable` also runs); tests compare the
resulting maps (lookups of every page, slot contents, recency, free segments) step by step
inside the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spin_ray.kernels.lru_victims import (
    lru_keys,
    lru_keys_ref,
    lru_pick,
    lru_victims,
    lru_victims_ref,
)
from spin_ray.kernels.residency_ref import add_pages_ref, drop_pages_ref, lookup_ref, touch_ref


@triton.jit
def _evict_victims(
    cand_row,  # [N] int64 the request's slots, -1 padded
    n_row,  # its slots (the list's first n_row entries)
    need,  # victims to take: the row's misses
    row_victims,  # scratch [K] int64: the victims' slots in rank order
    slot_page_row,  # [Q] int32 this (layer, head)'s slot contents
    bucket_row,  # [Q] uint8 its recency
    dir_ptr,
    dir_base,
    seg_ptr,
    count_ptr,
    home_ptr,
    stack_ptr,
    top_ptr,
    SEG: tl.constexpr,
    NUM_KEYS: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= n_row
):
    """List the row's `need` LRU victims in rank order and forget the pages they held; returns
    the number of pages forgotten (evictions)."""
    nn = tl.arange(0, BLOCK_N)
    n_in = nn < n_row
    cand = tl.load(cand_row + nn, mask=n_in, other=-1)
    own = cand >= 0
    at = tl.where(own, cand, 0)
    occupant = tl.load(slot_page_row + at, mask=own, other=-1)
    bucket = tl.load(bucket_row + at, mask=own, other=0).to(tl.int32)
    keys = tl.where(own, lru_keys(occupant, bucket), NUM_KEYS - 1)  # padding protected

    # victims: the `need` smallest keys, lowest index first (histogram, no sort)
    victim = lru_pick(keys, need, n_in, NUM_BINS)
    victim_rank = tl.cumsum(victim.to(tl.int32), 0) - 1
    tl.store(row_victims + tl.where(victim, victim_rank, 0), cand, mask=victim)

    # forget the pages the victims held; emptied segments go back on the stack
    gone = victim & (occupant >= 0)
    old = tl.where(gone, occupant, 0).to(tl.int64)
    old_seg = tl.load(dir_ptr + dir_base + old // SEG, mask=gone, other=0).to(tl.int64)
    tl.store(seg_ptr + old_seg * SEG + old % SEG, tl.full([BLOCK_N], -1, tl.int32), mask=gone)
    left = tl.atomic_add(count_ptr + old_seg, tl.full([BLOCK_N], -1, tl.int32), mask=gone)
    emptied = gone & (left == 1)
    home = tl.load(home_ptr + old_seg, mask=emptied, other=0)
    tl.store(dir_ptr + home, tl.full([BLOCK_N], -1, tl.int32), mask=emptied)
    tl.store(home_ptr + old_seg, tl.full([BLOCK_N], -1, tl.int64), mask=emptied)
    ones = tl.full([BLOCK_N], 1, tl.int64)
    pos = tl.atomic_add(top_ptr + tl.zeros([BLOCK_N], tl.int32), ones, mask=emptied)
    tl.store(stack_ptr + tl.where(emptied, pos, 0), old_seg, mask=emptied)
    return tl.sum(gone.to(tl.int64), 0)


@triton.jit
def _lookup_evict_kernel(
    pages_ptr,  # [B, H, K] int64, -1 = none
    rows_ptr,  # [B] int64 directory rows
    cand_ptr,  # [B, N] int64 the request's slots, -1 padded
    cand_len_ptr,  # [B] int64 how many (each list's first entries)
    dir_ptr,  # [R, L, H, DL] int32
    seg_ptr,  # [C, SEG] int32
    count_ptr,  # [C] int32
    home_ptr,  # [C] int64
    stack_ptr,  # [C] int64
    top_ptr,  # [1] int64
    slot_page_ptr,  # [H, Q] int32 (this layer)
    bucket_ptr,  # [H, Q] uint8 (this layer)
    slots_ptr,  # out [B, H, K] int64 resident slot of each hit, victim slot of each miss
    dst_ptr,  # out [B, H, K] int64 victim slot of each miss, -1 otherwise
    victims_ptr,  # scratch [B, H, K] int64 the row's victim slots in rank order
    counters_ptr,  # [4] int64 lookups, hits, evictions, fetched bytes
    layer,
    num_layers,
    num_heads,
    dir_len,
    num_slots,
    K,
    N,
    page_bytes,
    SEG: tl.constexpr,
    NUM_KEYS: tl.constexpr,
    NUM_BINS: tl.constexpr,
    NEWEST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kk = tl.arange(0, BLOCK_K)
    k_in = kk < K
    out = (b * num_heads + h) * K + kk
    page = tl.load(pages_ptr + out, mask=k_in, other=-1)
    valid = page >= 0
    safe = tl.where(valid, page, 0)
    row = tl.load(rows_ptr + b)
    dir_base = ((row * num_layers + layer) * num_heads + h) * dir_len
    seg = tl.load(dir_ptr + dir_base + safe // SEG, mask=valid, other=-1).to(tl.int64)
    found = valid & (seg >= 0)
    slot = tl.load(seg_ptr + tl.where(found, seg, 0) * SEG + safe % SEG, mask=found, other=-1)
    slot = slot.to(tl.int64)
    hit = valid & (slot >= 0)
    miss = valid & (slot < 0)
    newest = tl.full([BLOCK_K], NEWEST, tl.uint8)
    tl.store(bucket_ptr + h * num_slots + tl.where(hit, slot, 0), newest, mask=hit)
    tl.debug_barrier()  # the candidates' keys below read the hits' new recency

    # the row's candidate count picks the register block at run time (one compiled kernel
    # for every buffer size: a row costs about its own slots, however wide the lists are)
    n_row = tl.load(cand_len_ptr + b)
    need = tl.sum(miss.to(tl.int32), 0)
    row_victims = victims_ptr + (b * num_heads + h) * K
    cand_row = cand_ptr + b * N
    slot_page_row = slot_page_ptr + h * num_slots
    bucket_row = bucket_ptr + h * num_slots
    if n_row <= BLOCK_N // 16:
        evicted = _evict_victims(
            cand_row, n_row, need, row_victims, slot_page_row, bucket_row, dir_ptr, dir_base,
            seg_ptr, count_ptr, home_ptr, stack_ptr, top_ptr, SEG, NUM_KEYS, NUM_BINS,
            BLOCK_N // 16,
        )  # fmt: skip
    elif n_row <= BLOCK_N // 4:
        evicted = _evict_victims(
            cand_row, n_row, need, row_victims, slot_page_row, bucket_row, dir_ptr, dir_base,
            seg_ptr, count_ptr, home_ptr, stack_ptr, top_ptr, SEG, NUM_KEYS, NUM_BINS,
            BLOCK_N // 4,
        )  # fmt: skip
    else:
        evicted = _evict_victims(
            cand_row, n_row, need, row_victims, slot_page_row, bucket_row, dir_ptr, dir_base,
            seg_ptr, count_ptr, home_ptr, stack_ptr, top_ptr, SEG, NUM_KEYS, NUM_BINS, BLOCK_N,
        )  # fmt: skip
    tl.debug_barrier()  # the row's victims are listed

    # the r-th miss takes the r-th victim
    miss_rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    dst = tl.load(row_victims + tl.where(miss, miss_rank, 0), mask=miss, other=-1)
    dst = tl.where(miss, dst, -1)
    tl.store(dst_ptr + out, dst, mask=k_in)
    tl.store(slots_ptr + out, tl.where(hit, slot, dst), mask=k_in)

    tl.atomic_add(counters_ptr + 0, tl.sum(valid.to(tl.int64), 0))
    tl.atomic_add(counters_ptr + 1, tl.sum(hit.to(tl.int64), 0))
    tl.atomic_add(counters_ptr + 2, evicted)
    tl.atomic_add(counters_ptr + 3, need.to(tl.int64) * page_bytes)


@triton.jit
def _insert_touch_kernel(
    pages_ptr,
    rows_ptr,
    dir_ptr,
    seg_ptr,
    count_ptr,
    home_ptr,
    stack_ptr,
    top_ptr,
    slot_page_ptr,
    bucket_ptr,
    dst_ptr,  # [B, H, K] int64 from launch 1
    layer,
    num_layers,
    num_heads,
    dir_len,
    num_slots,
    K,
    SEG: tl.constexpr,
    NEWEST: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kk = tl.arange(0, BLOCK_K)
    k_in = kk < K
    out = (b * num_heads + h) * K + kk
    page = tl.load(pages_ptr + out, mask=k_in, other=-1)
    safe = tl.where(page >= 0, page, 0)
    dst = tl.load(dst_ptr + out, mask=k_in, other=-1)
    miss = dst >= 0
    row = tl.load(rows_ptr + b)
    entry = ((row * num_layers + layer) * num_heads + h) * dir_len + safe // SEG
    seg = tl.load(dir_ptr + entry, mask=miss, other=0).to(tl.int64)
    need = miss & (seg < 0)
    # one new segment per distinct empty entry: the first miss to swap -1 -> -2 takes it
    # (-3 never matches, so the other lanes leave their entry alone)
    claimed = tl.atomic_cas(
        dir_ptr + entry, tl.where(need, -1, -3), tl.full([BLOCK_K], -2, tl.int32)
    )
    win = need & (claimed == -1)
    minus = tl.full([BLOCK_K], -1, tl.int64)
    pos = tl.atomic_add(top_ptr + tl.zeros([BLOCK_K], tl.int32), minus, mask=win) - 1
    new = tl.load(stack_ptr + tl.where(win, pos, 0), mask=win, other=0)
    tl.store(dir_ptr + entry, new.to(tl.int32), mask=win)
    tl.store(home_ptr + tl.where(win, new, 0), entry, mask=win)
    tl.debug_barrier()  # the other misses of a claimed entry read the segment it took
    seg = tl.where(need, tl.load(dir_ptr + entry, mask=need, other=0).to(tl.int64), seg)
    tl.store(seg_ptr + seg * SEG + safe % SEG, dst.to(tl.int32), mask=miss)
    tl.atomic_add(count_ptr + seg, tl.full([BLOCK_K], 1, tl.int32), mask=miss)
    tl.store(slot_page_ptr + h * num_slots + tl.where(miss, dst, 0), page.to(tl.int32), mask=miss)
    newest = tl.full([BLOCK_K], NEWEST, tl.uint8)
    tl.store(bucket_ptr + h * num_slots + tl.where(miss, dst, 0), newest, mask=miss)


def fits(num_pages: int, num_candidates: int) -> bool:
    """Whether a row's vectors (K selected pages, N candidate slots) fit one program (else the
    torch path runs)."""
    return num_pages <= 1024 and num_candidates <= 8192


def spin_retrieve(
    pages: torch.Tensor,  # [B, H, K] int64 logical pages, -1 = none (distinct per row)
    rows: torch.Tensor,  # [B] int64 directory rows
    cand: torch.Tensor,  # [B, N] int64 each request's slots, -1 padded
    cand_len: torch.Tensor,  # [B] int64 each request's slot count (its list's first entries)
    layer: int,
    directory: torch.Tensor,  # [R, L, H, DL] int32
    segments: torch.Tensor,  # [C, SEG] int32
    seg_count: torch.Tensor,  # [C] int32
    seg_home: torch.Tensor,  # [C] int64
    free_stack: torch.Tensor,  # [C] int64
    free_top: torch.Tensor,  # [1] int64 (enough segments reserved for this call)
    slot_page: torch.Tensor,  # [H, Q] int32 this layer's slot contents
    slot_bucket: torch.Tensor,  # [H, Q] uint8 this layer's recency
    counters: torch.Tensor,  # [4] int64 lookups, hits, evictions, fetched bytes (added to)
    num_keys: int,  # LRU keys: 0 empty, 1 + bucket, num_keys - 1 protected (padding)
    newest_bucket: int,  # recency of a slot used this step (no slot holds it before: `age` ran)
    page_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 × [B, H, K] int64: slots, fetch destinations
    """Fused retrieval of one layer (see the module docstring). Returns the slot of every
    selected page (-1 = none) and, for misses, the slot their page must be fetched into (-1
    elsewhere); the residency maps and counters are updated in place."""
    b, h, k = pages.shape
    n = cand.shape[1]
    assert rows.shape == cand_len.shape == (b,) and cand.shape[0] == b
    assert directory.dim() == 4 and directory.shape[2] == h and slot_page.shape[0] == h
    assert slot_bucket.shape == slot_page.shape and slot_bucket.dtype == torch.uint8
    assert directory.dtype == segments.dtype == seg_count.dtype == slot_page.dtype == torch.int32
    assert pages.dtype == rows.dtype == cand.dtype == cand_len.dtype == torch.int64
    assert seg_home.dtype == torch.int64
    assert free_stack.dtype == free_top.dtype == counters.dtype == torch.int64
    for t in (pages, rows, cand, cand_len, directory, segments, seg_count, seg_home, free_stack,
              slot_page, slot_bucket, counters):  # fmt: skip
        assert t.is_contiguous()
    assert 0 < num_keys <= 256 and fits(k, n)
    slots = torch.empty_like(pages)
    dst = torch.empty_like(pages)
    victims = torch.empty_like(pages)
    if pages.numel() == 0:
        return slots, dst
    common = dict(
        layer=layer,
        num_layers=directory.shape[1],
        num_heads=h,
        dir_len=directory.shape[3],
        num_slots=slot_page.shape[1],
        K=k,
        SEG=segments.shape[1],
        NEWEST=newest_bucket,
        BLOCK_K=triton.next_power_of_2(k),
    )
    _lookup_evict_kernel[(b, h)](
        pages, rows, cand, cand_len, directory, segments, seg_count, seg_home, free_stack,
        free_top, slot_page, slot_bucket, slots, dst, victims, counters,
        N=n, page_bytes=page_bytes, NUM_KEYS=num_keys,
        NUM_BINS=triton.next_power_of_2(num_keys + 1), BLOCK_N=max(256, triton.next_power_of_2(n)),
        **common,
    )  # fmt: skip
    _insert_touch_kernel[(b, h)](
        pages, rows, directory, segments, seg_count, seg_home, free_stack, free_top,
        slot_page, slot_bucket, dst,
        **common,
    )  # fmt: skip
    return slots, dst


# ------------------------------------------------------------------ torch reference


def spin_retrieve_ref(
    pages: torch.Tensor,  # [B, H, K] int64 logical pages, -1 = none (distinct per row)
    rows: torch.Tensor,  # [B] int64 directory rows
    cand: torch.Tensor,  # [B, N] int64 each request's slots, -1 padded
    cand_len: torch.Tensor,  # [B] int64 (unused: the -1 padding says it)
    layer: int,
    directory: torch.Tensor,  # [R, L, H, DL] int32
    segments: torch.Tensor,  # [C, SEG] int32
    seg_count: torch.Tensor,  # [C] int32
    seg_home: torch.Tensor,  # [C] int64
    free_stack: torch.Tensor,  # [C] int64
    free_top: torch.Tensor,  # [1] int64 (enough segments reserved for this call)
    slot_page: torch.Tensor,  # [H, Q] int32 this layer's slot contents (a view of all layers')
    slot_bucket: torch.Tensor,  # [H, Q] uint8 this layer's recency
    counters: torch.Tensor,  # [4] int64 lookups, hits, evictions, fetched bytes (added to)
    num_keys: int,
    newest_bucket: int,
    page_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 × [B, H, K] int64: slots, fetch destinations
    """`spin_retrieve` in torch operations, with fixed shapes and no host synchronisation (what
    the CPU runs, and CUDA for rows too wide for one program): the same victims, pairing, map
    updates and counts. On CUDA the victims come from the `lru_victims` kernel."""
    b, h, k = pages.shape
    device = pages.device
    valid = pages >= 0
    slots = lookup_ref(directory, segments, rows, layer, pages)  # [B, H, K]
    hit = slots >= 0
    miss = valid & ~hit
    counters[0] += valid.sum()
    counters[1] += hit.sum()

    # candidates: the request's slots in this (layer, head), keyed for the LRU; the slots of
    # this step's hits (the only ones in the newest bucket) and the padding protected
    n = cand.shape[1]
    safe = cand.clamp(min=0)
    occupant = slot_page[:, safe].permute(1, 0, 2)  # [B, H, n]
    keys = lru_keys_ref(occupant, slot_bucket[:, safe].permute(1, 0, 2))
    spare = slot_page.shape[1]
    slot_pos = torch.full((spare + 1,), n, dtype=torch.int64, device=device)
    slot_pos[torch.where(cand >= 0, cand, spare)] = torch.arange(n, device=device)  # [Q + 1]
    hit_pos = torch.where(hit, slot_pos[slots.clamp(min=0)], n)  # [B, H, K] list positions
    protect = torch.zeros(b, h, n + 1, dtype=torch.bool, device=device)
    protect = protect.scatter_(2, hit_pos, True)[..., :n] | (cand < 0)[:, None, :]
    keys = keys.masked_fill(protect, num_keys - 1)
    need = miss.sum(-1)  # [B, H]  <= unprotected slots: slots >= floor >= mandatory
    keys = keys.flatten(0, 1)  # [B * H, n]
    if keys.is_cuda:
        victims = lru_victims(keys.to(torch.uint8).contiguous(), need.flatten(), num_keys)
    else:
        victims = lru_victims_ref(keys, need.flatten(), num_keys)
    victims = victims.view(b, h, n)
    counters[2] += (victims & (occupant >= 0)).sum()

    # the r-th miss of each (sequence, head) row takes the row's r-th victim
    ranks = torch.arange(n, device=device).expand(b, h, n)
    victim_rank = torch.where(victims, victims.long().cumsum(-1) - 1, n)  # [B, H, n]
    victim_at = torch.zeros(b, h, n + 1, dtype=torch.int64, device=device)
    victim_at.scatter_(2, victim_rank, ranks)  # [B, H, n+1] list position of rank r
    miss_rank = torch.where(miss, miss.long().cumsum(-1) - 1, n)  # [B, H, K]
    at = victim_at.gather(2, miss_rank)  # [B, H, K]
    dst = torch.where(miss, cand.gather(1, at.view(b, h * k)).view(b, h, k), -1)

    # the misses' pages into their victims' slots, then every listed slot newest
    heads = torch.arange(h, device=device)[None, :, None].expand(b, h, k).flatten()  # [M]
    entry_rows = rows[:, None, None].expand(b, h, k).flatten()  # [M]
    work = miss.flatten()
    into = torch.where(work, dst.flatten(), 0)
    place = heads * slot_page.shape[1] + into  # [M] in this layer's [H * Q]
    maps = (directory, segments, seg_count, seg_home, free_stack, free_top, slot_page.view(-1))
    drop_pages_ref(*maps, place, entry_rows, layer, heads, work)
    add_pages_ref(*maps, place, entry_rows, layer, heads, into, pages.flatten(), work)
    counters[3] += miss.sum() * page_bytes
    slots = torch.where(miss, dst, slots)
    touch_ref(slot_bucket, heads, slots.flatten(), valid.flatten(), newest_bucket)
    return slots, dst
