"""Retrieve: map each decode step's selected pages of one layer to GPU-tier slots that hold
them, fetching what is missing from the CPU tier in one batched gather per layer.

`BufferedRetrieve` ("spin" mode) keeps fetched pages resident across steps in each request's
HBM buffer: it looks the pages up in the residency table, gives each miss the slot of a victim
of the bucketed LRU (`kernels/lru_victims.py`) and fetches the misses. `StagedRetrieve`
(sparse-naive, dense-offload) keeps nothing: the request's slots are a staging area refilled
for every layer, and the GPU tier has one layer.

Both run on fixed-shape tensors — selected pages [B, Hkv, K] (-1 padded), request slots
[B, n] — and never synchronise with the host: misses are paired with LRU victims by rank (the
r-th miss of a (sequence, head) row takes its r-th victim), residency updates are masked
scatters, the gather kernel skips entries with nothing to fetch and the statistics count on the
device. Invariants a sync would check (a request holds at least its mandatory pages; enough
free residency segments) are kept by the manager and by `plan` once per step;
`SparseConfig.check_invariants` checks them per layer (tests; it synchronises).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from spin_ray.kernels.lru_victims import lru_num_keys
from spin_ray.kernels.spin_retrieve import fits, spin_retrieve, spin_retrieve_ref
from spin_ray.kernels.uva_gather import MAX_PROGRAMS
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.decode_step import DecodeStep
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import DeviceTier, HostTier


class Retrieve(ABC):
    """The GPU-tier slots of a layer's selected pages, their K/V fetched in."""

    def __init__(self, host: HostTier, gpu: DeviceTier, counters: KVCounters, checks: bool):
        self.host = host
        self.gpu = gpu
        self.counters = counters
        self.checks = checks
        """Check per layer what the manager guarantees (`SparseConfig.check_invariants`)."""

    retrievals_per_layer = 1
    """Retrievals an offloaded layer runs per decode step (what `plan` reserves for)."""

    def plan(self, step: DecodeStep) -> None:
        """Prepare for the step's retrievals (once per step, before its layers)."""

    @abstractmethod
    def tier_layer(self, layer: int) -> int:
        """The GPU tier's layer that holds offloaded layer `layer`'s slots."""

    @abstractmethod
    def slots(
        self,
        layer: int,  # offloaded layer
        pages: torch.Tensor,  # [B, Hkv, K] int64 selected logical pages, -1 = none
        step: DecodeStep,
    ) -> torch.Tensor:  # [B, Hkv, K] int64 the slot holding each page (-1 = none)
        """Make every selected page resident in a slot of its request (in `tier_layer`) and
        return the slots; counts lookups, hits, evictions and fetched bytes."""

    def fetch(
        self,
        layer: int,  # offloaded layer
        pages: torch.Tensor,  # [B, Hkv, K] int64 logical pages
        dst: torch.Tensor,  # [B, Hkv, K] int64 slots to fetch them into, -1 = skip
        step: DecodeStep,
        programs: int = MAX_PROGRAMS,
        counted: bool = False,
    ) -> None:
        """Copy page pages[b, h, j] of K/V head h into GPU slot dst[b, h, j] where dst >= 0
        (`counted`: the bytes are already counted; `programs`: `HostTier.fetch`'s)."""
        b, h, k = pages.shape
        table = step.batch.page_table  # [B, maxp] int32
        src = table.gather(1, pages.clamp(min=0).view(b, h * k)).view(b, h, k)
        tier_layer = self.tier_layer(layer)
        gpu_k, gpu_v = self.gpu.k[tier_layer], self.gpu.v[tier_layer]
        self.host.fetch(
            layer, gpu_k, gpu_v, src.flatten(), step.listed_heads, dst.flatten(), programs
        )
        if not counted:
            self.counters.add_fetched_bytes((dst >= 0).sum() * self.host.page_bytes)


class StagedRetrieve(Retrieve):
    """No buffer: every listed page is fetched into the request's slots, in list order."""

    def tier_layer(self, layer: int) -> int:
        return 0

    def slots(self, layer, pages, step):  # [B, Hkv, K] slots
        valid = pages >= 0
        pos = valid.long().cumsum(-1) - 1  # [B, Hkv, K]
        b, h, k = pages.shape
        n = step.slot_lists.shape[1]
        listed = step.slot_lists.gather(1, pos.clamp(0, n - 1).view(b, h * k)).view(b, h, k)
        slots = torch.where(valid & (pos < n), listed, -1)
        if self.checks and bool((valid & (slots < 0)).any()):
            raise RuntimeError("a request holds fewer GPU slots than its mandatory pages")
        self.fetch(layer, pages, slots, step)
        self.counters.add_lookups(valid.sum(), 0)
        return slots


class BufferedRetrieve(Retrieve):
    """Pages stay resident in the request's slots across steps; misses evict by bucketed LRU."""

    def __init__(
        self,
        host: HostTier,
        gpu: DeviceTier,
        manager: TieredCacheManager,
        budget: PageBudget,
        checks: bool,
        fused: bool,
        retrievals_per_layer: int,
    ):
        super().__init__(host, gpu, manager.counters, checks)
        self.manager = manager
        self.residency = manager.residency
        self.budget = budget
        self.fused = fused
        """Retrieve with the fused Triton kernels (`SparseConfig.fused_retrieve`)."""
        self.retrievals_per_layer = retrievals_per_layer
        self.device = gpu.k.device
        self.lru_keys = lru_num_keys(self.residency.lru_buckets)

    def tier_layer(self, layer: int) -> int:
        return layer

    def plan(self, step: DecodeStep) -> None:
        """Age the LRU one step and reserve the residency segments the step's inserts may
        take: one per row and page at most, per retrieval."""
        residency = self.residency
        residency.age()
        windows, seg = step.windows, residency.segment_pages
        width = windows.sink_pages + windows.max_topk + windows.max_local
        per_row = sum(
            min(width, -(-self.budget.num_pages(t) // seg)) for t in step.context_lens_cpu
        )
        heads = residency.num_layers * residency.num_heads
        residency.reserve(self.retrievals_per_layer * heads * per_row)

    def slots(self, layer, pages, step):  # [B, Hkv, K] slots
        slots, dst = self.retrieve(layer, pages, step, self.counters.device_counts)
        self.fetch(layer, pages, dst, step, counted=True)
        return slots

    def retrieve(self, layer, pages, step, counts):  # 2 × [B, Hkv, K]: slots, dst
        """Look the pages up in the buffer and give each miss an LRU victim's slot: returns
        every page's slot and, for misses, the slot to fetch it into (-1 elsewhere); counts
        lookups, hits, evictions and the bytes to fetch into `counts` [4]. The fused kernels
        (`fused`) or, for rows too wide for one program or without them, their torch
        reference."""
        wide = not fits(pages.shape[2], step.slot_lists.shape[1])
        if self.checks:
            owned = (step.slot_lists >= 0).sum(-1)  # [B]
            if bool(((pages >= 0).sum(-1) > owned[:, None]).any()):
                raise RuntimeError("a request holds fewer GPU slots than its mandatory pages")
        residency = self.residency
        retrieve = spin_retrieve_ref if wide or not self.fused else spin_retrieve
        slots, dst = retrieve(
            pages, step.rows, step.slot_lists, step.slot_counts, layer,
            residency.directory, residency.segments, residency.seg_count, residency.seg_home,
            residency.free_stack, residency.free_top,
            residency.slot_page[layer], residency.slot_bucket[layer],
            counts, self.lru_keys, residency.lru_buckets - 1, self.host.page_bytes,
        )  # fmt: skip
        if self.checks and int(residency.free_top) < 0:
            raise RuntimeError("residency segments were not reserved for this step")
        return slots, dst
