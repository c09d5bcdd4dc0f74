"""CUDA graphs of decode-only steps.

A decode step launches a few hundred small kernels (per layer: norms, projections, RoPE, the
KV write, attention, and for the sparse cache page selection and retrieval); launched one by
one from Python, the step costs far more host time than GPU time. Capturing the step's
`model.forward` + `compute_logits` in a CUDA graph replays all of them with one launch.

A graph bakes in its tensors' addresses and shapes, so a decode batch is padded to one of a
few batch sizes (`AttentionMetadata.num_padded`), the step's inputs are copied into persistent
buffers (`StepBuffers`, one per shape), and the backend names the shapes and launch parameters
its layers use (`AttentionBackend.graph_key`). The first step of a key runs eagerly (it also
warms up compilation and autotuning) and then captures the graph; later steps with that key
replay it. The page table is padded to a power-of-two width, at least the backend's
`graph_page_width`: the sparse backend fixes it (and its slot lists' width), so as contexts
grow its steps keep one key per batch size instead of capturing anew at each power of two.
A key carries the backend's buffer generation: when the backend reallocates a table its graphs
read, every graph is dropped and recaptured on demand.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from spin_ray.attention.backend import GraphKey
from spin_ray.device.step_buffers import StepBuffers
from spin_ray.engine.batch_inputs import BatchInputs, GraphBatch

logger = logging.getLogger(__name__)


EVERY_SIZE_UP_TO = 16
"""Decode batches up to this size get a graph of their own size. Padding rows are not free: on
the H200 (Llama-3.1-8B shape, spin, 9 requests of 58K, budget 1,024) the step of 9 took 15.82
ms GPU in a graph of 9 against 16.54 padded to 16 (the dense layers' split count chosen for 16
rows, Quest's programs for the padding rows, 16-row GEMMs; bench/RESULTS.md); a capture costs
~0.35 s, once per size."""


def graph_batch_sizes(max_num_seqs: int, every_size_up_to: int = EVERY_SIZE_UP_TO) -> list[int]:
    """Every size up to `every_size_up_to`, then every multiple of 8, up to and including
    max_num_seqs."""
    sizes = list(range(1, min(every_size_up_to, max_num_seqs) + 1))
    sizes += range(8 * (every_size_up_to // 8 + 1), max_num_seqs, 8)
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    """Runs the model on padded decode batches, replaying one CUDA graph per key.

    `capture=False` runs the same padded, persistent-buffer steps eagerly (what the CPU can
    check of the graph path; nothing is captured)."""

    def __init__(
        self,
        model,
        max_num_seqs: int,
        device: torch.device,
        capture: bool = True,
        page_width: int = 0,
        sizes: list[int] | None = None,
    ):
        self.model = model
        self.sizes = sizes or graph_batch_sizes(max_num_seqs)
        """The graph batch sizes, ascending (default `graph_batch_sizes`)."""
        self.page_width = page_width
        """The least page-table width of a graph batch (`AttentionBackend.graph_page_width`)."""
        self.device = device
        self.buffers = StepBuffers(device)
        self.capture = capture
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.generation = 0
        self._pool = None
        self.captures = 0
        """Graphs captured so far (with `capture=False`: keys first met since the last
        generation change, the graphs a GPU would capture)."""
        self.capture_seconds = 0.0
        """Wall time of those steps' eager run and capture (compilation and autotuning of
        a new shape happen there)."""
        self._seen: set[tuple] = set()  # keys met without capturing (`capture=False`)

    def layout(self, num_seqs: int) -> GraphBatch | None:
        """The padded layout of a decode batch of `num_seqs`; None above the largest size."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        if i == len(self.sizes):
            return None
        return GraphBatch(self.sizes[i], self.buffers, self.page_width)

    def run(self, inputs: BatchInputs, backend_key: GraphKey) -> torch.Tensor:  # [Bp, V] fp32
        """Logits of every (padded) row of a step laid out by `layout` and planned by the
        backend."""
        if backend_key.generation != self.generation:  # tables moved: old graphs are stale
            self.graphs.clear()
            self._seen.clear()
            self._pool = None
            self.generation = backend_key.generation
        key = (tuple(inputs.input_ids.shape), tuple(inputs.attention.page_table.shape),
               backend_key.shapes)  # fmt: skip
        entry = self.graphs.get(key)
        if entry is not None:
            graph, logits = entry
            graph.replay()
            return logits
        if not self.capture and key in self._seen:
            return self._forward(inputs)
        self._synchronize()
        start = time.perf_counter()
        logits = self._forward(inputs)  # this step's result; warms up what the capture records
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                captured = self._forward(inputs)
            self._pool = graph.pool()
            self.graphs[key] = (graph, captured)
            logger.debug("captured a decode graph for %s (%d graphs)", key, len(self.graphs))
        else:
            self._seen.add(key)
        self._synchronize()
        self.captures += 1
        self.capture_seconds += time.perf_counter() - start
        return logits

    def _synchronize(self) -> None:
        if self.capture:  # CUDA: time the capture's work, not just its launches
            torch.cuda.synchronize(self.device)

    def _forward(self, inputs: BatchInputs) -> torch.Tensor:
        hidden = self.model.forward(inputs.input_ids, inputs.positions)  # [Bp, H]
        return self.model.compute_logits(hidden)  # [Bp, V]
