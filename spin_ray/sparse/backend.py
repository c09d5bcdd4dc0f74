"""The attention backend of the sparse, hierarchical KV cache: a composition of SPIN's five
operations, each in its own module —

- Index (`index.py`): the algorithm's summaries, built as the K/V is stored (a prefill chunk's
  whole pages possibly laid out anew, RetroInfer's clusters);
- Offload (`offload.py`): every new token's K/V to the CPU tier (async on CUDA);
- Select (`selection.py`): the algorithm scores pages, the runtime picks sink + top-k + local;
- Retrieve (`retrieve.py`): the selected pages into GPU-tier slots (buffer lookup, bucketed-LRU
  eviction, one gather of the misses per layer);
- Attention (`decode_attention.py`): sparse paged attention over the resident pages;

with the prefill chunks' dense attention over their prefix (`prefill.py`), the lookahead's
early fetches (`lookahead.py`) and the per-step layout of the decode batch (`decode_step.py`).
Layers below `first_layer` run dense, their KV kept in HBM (a `DenseAttentionBackend`).

Per step (`plan`): wait for pending offloads, lay out the decode batch and prepare retrieval
(age the LRU, reserve residency segments). Per offloaded layer (`forward`): fold the new
tokens into the summaries, offload them (in the order the index lays them out), then decode
tokens select → retrieve → attend, prefill chunks attend densely.
"""

from __future__ import annotations

import torch

from spin_ray.attention.backend import AttentionBackend, GraphKey
from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.attention.metadata import AttentionMetadata, StepSplit
from spin_ray.device.step_buffers import bucket
from spin_ray.kernels.partition_topk import MAX_PARTITIONS
from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.decode_attention import SparseDecodeAttention
from spin_ray.sparse.decode_step import DecodeStep, DecodeStepPlanner
from spin_ray.sparse.index import SparseIndex
from spin_ray.sparse.lookahead import Lookahead
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.offload import Offload
from spin_ray.sparse.prefill import PrefillAttention
from spin_ray.sparse.retrieve import BufferedRetrieve, Retrieve, StagedRetrieve
from spin_ray.sparse.selection import select
from spin_ray.sparse.tiers import DeviceTier, HostTier


class SpinAttentionBackend(AttentionBackend):
    def __init__(
        self,
        config: SparseConfig,
        *,
        manager: TieredCacheManager,
        host: HostTier,
        gpu: DeviceTier,
        algorithm: SparseAlgorithm,
        budget: PageBudget,
        dense: DenseAttentionBackend | None,
        first_layer: int,
    ):
        self.manager = manager
        self.residency = manager.residency
        self.counters = manager.counters
        self.timer = self.counters.timer
        self.host = host
        self.gpu = gpu
        self.algorithm = algorithm
        self.dense = dense
        self.first_layer = first_layer
        self.checks = config.check_invariants
        on_cuda = gpu.k.device.type == "cuda"
        self.retrieve: Retrieve
        self.lookahead: Lookahead | None = None
        if config.retains:
            fused = on_cuda if config.fused_retrieve is None else config.fused_retrieve
            retrievals = Lookahead.retrievals_per_layer if config.lookahead else 1
            self.retrieve = BufferedRetrieve(
                host, gpu, manager, budget, self.checks, fused, retrievals
            )
            if config.lookahead:
                self.lookahead = Lookahead(algorithm, self.retrieve)
        else:
            self.retrieve = StagedRetrieve(host, gpu, self.counters, self.checks)
        self.offload = Offload(host, self.counters)
        self.prefill = PrefillAttention(
            manager, host, gpu, self.counters, holds_prefix=config.retains
        )
        self.index = SparseIndex(
            algorithm, budget, manager, host, self.counters, self.prefill.context_kv
        )
        self.attention = SparseDecodeAttention(algorithm, gpu)
        self.steps = DecodeStepPlanner(
            manager, budget, gpu.k.shape[1], gpu.k.device, config.lookahead_share
        )
        self.meta: AttentionMetadata | None = None
        self._step: DecodeStep | None = None

    # ------------------------------------------------------------------ per step

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        if self.dense is not None:
            self.dense.plan(meta)
        self.offload.begin_step(meta)
        split = StepSplit.of(meta)
        self.prefill.plan(meta, split)
        if self.lookahead is not None:
            self.lookahead.plan()
        self._step = self._plan_decode(meta, split) if split.decode_seqs else None

    def _plan_decode(self, meta: AttentionMetadata, split: StepSplit) -> DecodeStep:
        """Lay the decode rows out, prepare their retrievals."""
        decode = split.decode_seqs
        real = decode[: len(decode) - meta.num_padded]
        indexed = [self.index.covered(meta.context_lens_cpu[b]) for b in real]
        step = self.steps.plan(meta, decode, split.decode_rows, indexed)
        self.retrieve.plan(step)
        return step

    @property
    def retrievals_per_layer(self) -> int:
        """Buffer retrievals an offloaded layer runs per decode step: its own, and with
        lookahead the predicted one (what the residency's free segments must cover)."""
        return self.retrieve.retrievals_per_layer

    split_mixed_steps = True  # eager, a decode layer launches ~15 kernels; a graph, none

    @property
    def supports_cuda_graphs(self) -> bool:
        """The decode path is capturable when the algorithm scores from device tensors alone
        and no per-layer check synchronises."""
        return self.algorithm.graph_safe and not self.checks

    def use_cuda_graphs(self) -> None:
        self.timer.timed = False  # a replay cannot be timed per phase (the dense layers' too)

    def graph_page_width(self, max_model_len: int) -> int:
        """The page table of every context up to max_model_len (at most `MAX_PARTITIONS`
        pages: longer rows take the torch top-k, so they keep bucketed widths): page scoring
        and the top-k read a row's own pages only, and the slot lists are fixed too
        (`TieredCacheManager.slot_width`), so decode graphs are captured per batch size, not
        again (with Triton compiles, seconds each) whenever a context or buffer crosses a
        power of two."""
        return min(bucket(-(-max_model_len // self.manager.page_size)), MAX_PARTITIONS)

    def graph_key(self) -> GraphKey:
        step = self._step
        windows = step.windows
        shapes = (
            tuple(step.slot_lists.shape),
            (windows.sink_pages, windows.max_topk, windows.max_local),
            self.dense.graph_key().shapes if self.dense is not None else None,
        )
        return GraphKey(generation=self.residency.generation, shapes=shapes)

    # ------------------------------------------------------------------ per layer

    def forward(self, layer_idx, q, k, v, scale):
        meta = self.meta
        assert meta is not None, "plan() must be called before forward()"
        if layer_idx < self.first_layer:
            return self.dense.forward(layer_idx, q, k, v, scale)
        layer = layer_idx - self.first_layer
        step, chunks = self._step, self.prefill.chunks
        decode_rows = step.tokens if step is not None else None
        k_stored, v_stored = self.index.append(layer, meta, k, v, decode_rows, chunks)
        self.offload.store(layer, k_stored, v_stored, meta.slot_mapping)
        if not chunks:
            return self._decode(layer, q, k, v, scale)
        out = torch.empty_like(q)  # [N, Hq, D]
        if step is not None:
            t = step.tokens
            out[t] = self._decode(layer, q[t], k[t], v[t], scale)
        self.prefill.forward(layer, q, k, v, scale, out)
        return out

    def _decode(self, layer, q, k, v, scale):  # [Bd, Hq, D]
        """Select → retrieve → attend, for the decode tokens of one offloaded layer."""
        step = self._step
        with self.timer.phase("select"):
            pages = select(self.algorithm, layer, q, step.batch, step.windows)  # [Bd, Hkv, K]
        tier_layer = self.retrieve.tier_layer(layer)
        with self.timer.phase("fetch"):
            if self.lookahead is not None:
                self.lookahead.join(layer)
            slots = self.retrieve.slots(layer, pages, step)
            self.gpu.store_tokens(tier_layer, pages, slots, step.last_page, step.last_offset, k, v)
        with self.timer.phase("attention"):
            return self.attention(layer, tier_layer, q, pages, slots, step, scale)

    def lookahead_rows(self, layer_idx: int) -> torch.Tensor | None:  # [Bd] int64
        if self.lookahead is None or self._step is None or layer_idx < self.first_layer:
            return None
        return self._step.tokens

    def prefetch(self, layer_idx, q):  # q: [Bd, Hq, D] predicted queries of the decode rows
        with self.timer.phase("fetch"):
            self.lookahead.prefetch(layer_idx - self.first_layer, q, self._step)

    def store_prompt_kv(self, request_id, slots, k, v):
        first = self.first_layer
        if first:
            self.dense.store_prompt_kv(request_id, slots, k[:first], v[:first])
        table = torch.tensor(self.manager.table(request_id), device=slots.device)  # [pages]
        stored = [
            self.index.append_prompt(request_id, slots, table, layer_k, layer_v, layer)
            for layer, (layer_k, layer_v) in enumerate(zip(k[first:], v[first:], strict=True))
        ]
        self.offload.store_prompt(slots, [k for k, _ in stored], [v for _, v in stored])

    # ------------------------------------------------------------------ lifecycle

    def release(self, request_id: str) -> None:
        if self.dense is not None:
            self.dense.release(request_id)
