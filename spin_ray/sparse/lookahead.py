"""Lookahead (`SparseConfig.lookahead`, "spin" mode): while a decode step computes layer l,
select layer l + 1's pages with a query predicted from layer l's input, place them in the HBM
buffer and fetch the misses — on CUDA on a side stream, so their PCIe time overlaps layer l's
compute. Layer l + 1 then waits for that fetch (`join`) and selects with its real query as
always: the same pages are attended, so the same tokens; it fetches only what the prediction
missed. Its lookups do not count in the hit rate (`KVCounters.prefetch_counts`)."""

from __future__ import annotations

import torch

from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.decode_step import DecodeStep
from spin_ray.sparse.retrieve import BufferedRetrieve
from spin_ray.sparse.selection import select


class Lookahead:
    retrievals_per_layer = 2
    """A layer's retrievals per step with lookahead: the predicted one and its own."""

    def __init__(self, algorithm: SparseAlgorithm, retrieve: BufferedRetrieve):
        self.algorithm = algorithm
        self.retrieve = retrieve
        self.counters = retrieve.counters
        self.device = retrieve.device
        self.on_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        """The lookahead's fetches (with `HostTier.overlap_programs`: beside the compute)."""
        self._fetches: dict[int, tuple[torch.cuda.Event, tuple]] = {}
        """Offloaded layer → (event after its lookahead fetch, tensors that fetch reads)."""

    def plan(self) -> None:
        """A new forward: no fetch of the previous one is waited for any more."""
        self._fetches.clear()

    def prefetch(
        self,
        layer: int,  # offloaded layer
        q: torch.Tensor,  # [Bd, Hq, D] predicted queries of the decode rows
        step: DecodeStep,
    ) -> None:
        """Select the layer's pages with the predicted queries (the best-scored share of each
        top-k, `DecodeWindows.prefetch_topk`), place them in the buffer (the misses take LRU
        victims, the hits turn newest) and fetch the misses: on CUDA on the lookahead stream,
        which the layer waits for (`join`); on the CPU at once."""
        retrieve = self.retrieve
        pages = select(self.algorithm, layer, q, step.batch, step.windows,
                       step.windows.prefetch_topk)  # fmt: skip
        _, dst = retrieve.retrieve(layer, pages, step, self.counters.prefetch_counts)
        if not self.on_cuda:
            retrieve.fetch(layer, pages, dst, step, counted=True)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            programs = retrieve.host.overlap_programs
            retrieve.fetch(layer, pages, dst, step, programs, counted=True)
            done = torch.cuda.Event()
            done.record()
        self._fetches[layer] = (done, (pages, dst))  # alive until the join

    def join(self, layer: int) -> None:
        """Order the layer's work after its lookahead fetch (CUDA; no-op without one)."""
        entry = self._fetches.pop(layer, None)
        if entry is not None:
            torch.cuda.current_stream(self.device).wait_event(entry[0])
