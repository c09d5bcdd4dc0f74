"""The attention backend of the sparse, hierarchical KV cache.

Per step (`plan`): wait for pending offloads, age the LRU, bring each decoding sequence's index
up to date (algorithms without incremental summaries), and lay out the decode batch (windows,
slot lists). Per layer (`forward`):

- layers below `first_layer` run dense, their KV kept in HBM (a `DenseAttentionBackend`);
- every new token's K/V goes to the CPU tier (async on CUDA), and its key into the
  algorithm's summaries when they are incremental (Quest);
- prefill chunks attend densely over their prefix: kept in HBM, in prefill slots the manager
  gives a request at its first chunk (one per prompt page, while free slots and others' buffer
  excess allow; back at its first decode step), or else read back from the CPU tier (each
  layer's read started on the host's side stream while the layer before it computes: a PCIe
  read of the whole prefix per chunk, quadratic in the prompt length);
- decode tokens: the algorithm scores pages, the runtime picks sink + top-k + local pages per
  KV head, looks them up in the GPU tier, evicts by bucketed LRU, fetches every miss of the
  layer in one gather, and runs sparse paged attention over the resident pages.

With `retains=False` (sparse-naive, dense-offload) nothing stays resident between steps: the
request's slots are a staging area refilled for every layer, and the GPU tier has one layer.

The per-layer decode path runs on fixed-shape tensors — selected pages [B, Hkv, K] (-1 padded)
and request slots [B, n] — and never synchronises with the host: misses are paired with LRU
victims by rank (the r-th miss of a (sequence, head) row takes its r-th victim), residency
updates are masked scatters, the gather kernel skips entries with nothing to fetch and the
statistics count on the device. Invariants a sync would check (a request holds at least its
mandatory pages; enough free residency segments) are kept by the manager and by `reserve` once
per step; `SPIN_RAY_SPARSE_CHECKS=1` checks them per layer (tests; it synchronises).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from spin_ray.attention.backend import AttentionBackend, GraphKey
from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.attention.metadata import AttentionMetadata, PrefillChunk, StepSplit
from spin_ray.device.step_buffers import StepBuffers, bucket, to_device_async, to_step
from spin_ray.kernels.lru_victims import lru_victims, lru_victims_ref
from spin_ray.kernels.paged_attention_ref import prefill_attention_ref
from spin_ray.kernels.partition_topk import MAX_PARTITIONS
from spin_ray.kernels.sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_ref,
)
from spin_ray.kernels.spin_retrieve import fits, spin_retrieve
from spin_ray.kernels.uva_gather import MAX_PROGRAMS
from spin_ray.sparse.algorithms.base import SelectBatch, SparseAlgorithm
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.selection import DecodeWindows, select_pages
from spin_ray.sparse.tiers import DeviceTier, HostTier, PendingRead


@dataclass
class _IndexState:
    indexed_pages: int = 0
    steps_since_index: int | None = None  # None: never indexed


@dataclass(frozen=True)
class _DecodeStep:
    """The decode sequences of this step."""

    tokens: torch.Tensor  # [Bd] int64 rows of the packed batch
    rows: torch.Tensor  # [Bd] int64 residency directory rows
    context_lens: torch.Tensor  # [Bd] int64
    last_page: torch.Tensor  # [Bd] int64 logical page of the new token
    last_offset: torch.Tensor  # [Bd] int64 its row in that page
    slot_lists: torch.Tensor  # [Bd, n_max] int64 each request's GPU slots, -1 padded
    slot_counts: torch.Tensor  # [Bd] int64 how many (each list's first entries)
    listed_heads: torch.Tensor  # [Bd * Hkv * K] int64 the head of each listed page, flattened
    windows: DecodeWindows
    batch: SelectBatch


class SpinAttentionBackend(AttentionBackend):
    def __init__(
        self,
        *,
        manager: TieredCacheManager,
        host: HostTier,
        gpu: DeviceTier,
        algorithm: SparseAlgorithm,
        budget: PageBudget,
        dense: DenseAttentionBackend | None,
        first_layer: int,
        retains: bool,
        index_interval: int,
        lookahead: bool = False,
        lookahead_share: float = 1.0,
    ):
        self.manager = manager
        self.residency = manager.residency
        self.counters = manager.counters
        self.timer = self.counters.timer
        self.host = host
        self.gpu = gpu
        self.algorithm = algorithm
        self.budget = budget
        self.dense = dense
        self.first_layer = first_layer
        self.retains = retains
        self.index_interval = index_interval
        self.page_size = budget.page_size
        self.device = gpu.k.device
        self.on_cuda = self.device.type == "cuda"
        self.lru_keys = self.residency.lru_buckets + 2  # 0 empty, 1.. buckets, last protected
        self.meta: AttentionMetadata | None = None
        self._index: dict[str, _IndexState] = {}
        self._step: _DecodeStep | None = None
        self._prefills: list[PrefillChunk] = []
        self._prefill_held: list[torch.Tensor | None] = []
        """Per prefill chunk whose request's context is kept in HBM prefill slots: [T] int64
        slot * S + offset of each context position (the prefix, then the chunk's tokens), in a
        layer's [(Q + 1) * S] rows of one head; None: the prefix is read from the CPU tier."""
        self._prefix_reads: dict[tuple[int, int], PendingRead] = {}
        """(layer, chunk index) → its prefix, being read ahead on the host's side stream."""
        num_slots = gpu.k.shape[2]
        # position of each slot in its owner's list (this step); entry num_slots: a spare
        self._slot_pos = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=self.device)
        self.buffers = StepBuffers(self.device)
        """Persistent step tensors of CUDA-graph batches."""
        self._heads_of_lists: dict[tuple[int, int], torch.Tensor] = {}
        """(rows, list width) → the KV head of each listed page, flattened (`_listed_heads`)."""
        heads, page_size = host.k.shape[2], host.k.shape[3]
        self._offload_bytes_per_token = host.k.shape[0] * heads * host.page_bytes // page_size
        self.debug_checks = os.environ.get("SPIN_RAY_SPARSE_CHECKS") == "1"
        """Check per layer what the manager guarantees (synchronises: for tests)."""
        self.lookahead = lookahead and retains
        """Fetch each offloaded layer's pages one layer early, selected with a predicted query
        (`SparseConfig.lookahead`)."""
        self.lookahead_share = lookahead_share
        """The share of the top-k a lookahead selects (`SparseConfig.lookahead_share`)."""
        on_stream = self.on_cuda and self.lookahead
        self.prefetch_stream = torch.cuda.Stream(self.device) if on_stream else None
        """The lookahead's fetches (with `HostTier.overlap_programs`: beside the compute)."""
        self._prefetched: dict[int, tuple[torch.cuda.Event, tuple]] = {}
        """Offloaded layer → (event after its lookahead fetch, tensors that fetch reads)."""
        self.fused_retrieve = self.on_cuda and os.environ.get("SPIN_RAY_FUSED_RETRIEVE") != "0"
        """Retrieve with the fused Triton kernels (two launches per layer) instead of the torch
        path (which the CPU runs; SPIN_RAY_FUSED_RETRIEVE=0 selects it on CUDA too)."""

    # ------------------------------------------------------------------ per step

    def plan(self, meta: AttentionMetadata) -> None:
        self.meta = meta
        if self.dense is not None:
            self.dense.plan(meta)
        self.host.sync()
        new_tokens = sum(meta.query_lens_cpu) - meta.num_padded
        self.counters.d2h_bytes += new_tokens * self._offload_bytes_per_token
        split = StepSplit.of(meta)
        if self.manager.prefill_slots:  # a request's first decode step ends its prefill
            for b in split.decode_seqs[: len(split.decode_seqs) - meta.num_padded]:
                self.manager.end_prefill(meta.request_ids[b])
        self._prefills = split.prefills
        self._prefill_held = [self._held_prefill(meta, chunk) for chunk in split.prefills]
        self._prefix_reads.clear()
        self._prefetched.clear()
        self._step = (
            self._plan_decode(meta, split.decode_seqs, split.decode_rows)
            if split.decode_seqs
            else None
        )

    def _held_prefill(self, meta: AttentionMetadata, chunk: PrefillChunk) -> torch.Tensor | None:
        """The rows of the chunk's context in HBM prefill slots ([T] int64), the slots taken
        at its request's first chunk when more chunks follow; None (read any prefix from the
        CPU tier) when there were not enough slots, or when the GPU tier is a one-layer staging
        area (`retains=False`)."""
        if not self.retains:
            return None
        b, _, n, context_len = chunk
        request_id, prefix, s = meta.request_ids[b], context_len - n, self.page_size
        held = self.manager.prefill_slots.get(request_id)
        if held is None and prefix == 0 and context_len < self.manager.tokens[request_id]:
            held = self.manager.hold_prefill(request_id)  # a first chunk, more to come
        num_pages = -(-context_len // s)
        if held is None or len(held) < num_pages:
            return None
        slots = to_device_async(torch.tensor(held[:num_pages], dtype=torch.int64), self.device)
        pos = torch.arange(context_len, device=self.device)  # [T]
        return slots[pos // s] * s + pos % s  # [T]

    def _plan_decode(self, meta, decode: list[int], tokens: list[int]) -> _DecodeStep:
        """Lay out the decode sequences, with bucketed widths (slot lists, windows: the same
        shapes eagerly as in a CUDA graph, so the same numbers); for a CUDA-graph batch
        (`meta.graph_batch`: decode only, the last `num_padded` rows padding) in persistent
        buffers, the padding rows selecting nothing and storing into the scratch slot."""
        if self.retains:
            self.residency.age()
        pad = meta.num_padded
        real = decode[: len(decode) - pad]
        request_ids = tuple(meta.request_ids[b] for b in real)
        contexts = [meta.context_lens_cpu[b] for b in real]
        indexed = [self._update_index(rid, ctx) for rid, ctx in zip(request_ids, contexts)]
        device = self.device
        seg = self.residency.segment_pages
        buffers = self.buffers if meta.graph_batch else None

        def placed(name, values):  # host or device values -> the step's device tensor
            return to_step(name, values, device, buffers)

        # the per-row integers in one transfer, [7, Bd]: the real rows, then the padding's
        # (it stores into the scratch slot: last page -2 is listed nowhere; it holds no slots)
        ints = placed("decode_ints", torch.tensor([
            tokens,
            [self.manager.rows[rid] for rid in request_ids] + [0] * pad,
            contexts + [0] * pad,
            [(t - 1) // self.page_size for t in contexts] + [-2] * pad,
            [(t - 1) % self.page_size for t in contexts] + [0] * pad,
            indexed + [0] * pad,
            [len(self.manager.slots[rid]) for rid in request_ids] + [0] * pad,
        ], dtype=torch.int64))  # fmt: skip
        tokens_t, rows, context_lens, last_page, last_offset, indexed_pages, slot_counts = ints

        if meta.graph_batch:  # decode only: every row is a decode row (a persistent buffer)
            table_i32 = meta.page_table  # [Bd, maxp] int32
        else:
            rows_t = to_device_async(torch.tensor(decode), meta.page_table.device)  # [Bd]
            table_i32 = meta.page_table[rows_t]
        slot_lists = placed("slot_lists", self.manager.slot_lists(request_ids, rows))  # [Bd, n]
        positions = torch.arange(slot_lists.shape[1], device=device).expand_as(slot_lists)
        spare = self._slot_pos.numel() - 1
        self._slot_pos[torch.where(slot_lists >= 0, slot_lists, spare)] = positions
        windows = DecodeWindows.build(
            self.budget, contexts, indexed, device,
            buffers=buffers, num_padded=pad, prefetch_share=self.lookahead_share,
        )  # fmt: skip
        if self.retains:  # segments the step's inserts may take: one per row and page at most,
            # per retrieval (two per layer with lookahead: the predicted and the real one)
            width = windows.sink_pages + windows.max_topk + windows.max_local
            per_row = sum(min(width, -(-self.budget.num_pages(t) // seg)) for t in contexts)
            residency = self.residency
            heads = residency.num_layers * residency.num_heads
            residency.reserve(self.retrievals_per_layer * heads * per_row)
        listed = windows.sink_pages + min(windows.max_topk, table_i32.shape[1]) + windows.max_local
        return _DecodeStep(
            tokens=tokens_t,
            rows=rows,
            context_lens=context_lens,
            last_page=last_page,
            last_offset=last_offset,
            slot_lists=slot_lists,
            slot_counts=slot_counts,
            listed_heads=self._listed_heads(len(decode), listed),
            windows=windows,
            batch=SelectBatch(
                request_ids=request_ids,
                page_table=table_i32,
                num_pages=windows.num_pages,
                indexed_pages=indexed_pages,
                indexed_pages_cpu=tuple(indexed),
            ),
        )

    def _listed_heads(self, rows: int, width: int) -> torch.Tensor:  # [rows * Hkv * width]
        """The KV head of each entry of `rows` × Hkv page lists of `width`, flattened: the same
        for every step of that shape, so built once (and at one address, for CUDA graphs)."""
        heads = self._heads_of_lists.get((rows, width))
        if heads is None:
            hkv = self.gpu.k.shape[1]
            heads = torch.arange(hkv, device=self.device)[None, :, None].expand(rows, hkv, width)
            heads = self._heads_of_lists[(rows, width)] = heads.flatten()
        return heads

    split_mixed_steps = True  # eager, a decode layer launches ~15 kernels; a graph, none

    @property
    def supports_cuda_graphs(self) -> bool:
        """The decode path is capturable when the algorithm scores from device tensors alone
        and no per-layer check synchronises."""
        return self.algorithm.graph_safe and not self.debug_checks

    def use_cuda_graphs(self) -> None:
        self.timer.timed = False  # a replay cannot be timed per phase (the dense layers' too)

    def graph_page_width(self, max_model_len: int) -> int:
        """The page table of every context up to max_model_len (at most `MAX_PARTITIONS`
        pages: longer rows take the torch top-k, so they keep bucketed widths): page scoring
        and the top-k read a row's own pages only, and the slot lists are fixed too
        (`TieredCacheManager.slot_width`), so decode graphs are captured per batch size, not
        again (with Triton compiles, seconds each) whenever a context or buffer crosses a
        power of two."""
        return min(bucket(-(-max_model_len // self.page_size)), MAX_PARTITIONS)

    def graph_key(self) -> GraphKey:
        step = self._step
        windows = step.windows
        shapes = (
            tuple(step.slot_lists.shape),
            (windows.sink_pages, windows.max_topk, windows.max_local),
            self.dense.graph_key().shapes if self.dense is not None else None,
        )
        return GraphKey(generation=self.residency.generation, shapes=shapes)

    def _update_index(self, request_id: str, context_len: int) -> int:
        """Index the request's complete pages if due (first decode, then every
        `index_interval` steps); returns the pages the index covers (with incremental
        summaries: every complete page, nothing to do). Pages of the local window are left
        out (they are attended anyway): an index may lay their tokens out anew
        (`SparseAlgorithm.index`), and the local window must keep holding the last tokens."""
        unit = self.algorithm.index_unit_pages
        complete = (context_len - 1) // self.page_size  # stored before this step
        if self.algorithm.incremental:
            return complete // unit * unit
        window_start = max(0, context_len - self.budget.local_tokens) // self.page_size
        complete = min(complete, window_start) // unit * unit
        state = self._index.setdefault(request_id, _IndexState())
        due = state.steps_since_index is None or state.steps_since_index >= self.index_interval
        if due and complete > state.indexed_pages:
            with self.timer.phase("index"):
                self._index_pages(request_id, state.indexed_pages, complete)
            state.indexed_pages = complete
            state.steps_since_index = 0
        elif state.steps_since_index is not None:
            state.steps_since_index += 1
        return state.indexed_pages

    def _index_pages(self, request_id: str, first: int, end: int) -> None:
        table = self.manager.table(request_id)[first:end]
        page_ids = torch.tensor(table, dtype=torch.int64, device=self.device)
        heads = self.host.k.shape[2]
        for layer in range(self.host.k.shape[0]):
            k, v = self.host.read(layer, page_ids)  # [Hkv, n, S, D]
            self.counters.h2d_bytes += page_ids.numel() * heads * self.host.page_bytes
            perm = self.algorithm.index(layer, request_id, first, page_ids, k, v)
            if perm is not None:
                self._relayout(layer, request_id, first, page_ids, k, v, perm)

    def _relayout(self, layer, request_id, first, page_ids, k, v, perm) -> None:
        """Store the pages' tokens in the algorithm's order and drop stale resident copies."""
        hkv, n, s, d = k.shape
        idx = perm.long()[:, :, None].expand(hkv, n * s, d)
        k = k.reshape(hkv, n * s, d).gather(1, idx).view(hkv, n, s, d)
        v = v.reshape(hkv, n * s, d).gather(1, idx).view(hkv, n, s, d)
        self.host.write_pages(layer, page_ids, k, v)
        self.counters.d2h_bytes += n * hkv * self.host.page_bytes
        if self.retains and request_id in self.manager.rows:
            row = torch.tensor([self.manager.rows[request_id]], device=self.device)
            pages = torch.arange(first, first + n, device=self.device).expand(1, hkv, n)
            slots = self.residency.lookup(row, layer, pages)[0]  # [Hkv, n]
            heads = torch.arange(hkv, device=self.device)[:, None].expand_as(slots)
            self.residency.drop(layer, heads.flatten(), slots.flatten(), slots.flatten() >= 0)

    # ------------------------------------------------------------------ per layer

    def forward(self, layer_idx, q, k, v, scale):
        meta = self.meta
        assert meta is not None, "plan() must be called before forward()"
        if layer_idx < self.first_layer:
            return self.dense.forward(layer_idx, q, k, v, scale)
        layer = layer_idx - self.first_layer
        self.host.store(layer, k, v, meta.slot_mapping)
        if self.algorithm.incremental:
            self._append(layer, k)
        step = self._step
        if not self._prefills:
            return self._decode(layer, q, k, v, scale)
        out = torch.empty_like(q)  # [N, Hq, D]
        if step is not None:
            t = step.tokens
            out[t] = self._decode(layer, q[t], k[t], v[t], scale)
        for (b, start, n, ctx), held in zip(self._prefills, self._prefill_held, strict=True):
            rows = slice(start, start + n)
            if held is None:
                out[rows] = self._prefill(layer, b, q[rows], k[rows], v[rows], ctx, scale)
            else:
                out[rows] = self._prefill_held_in_hbm(layer, held, q[rows], k[rows], v[rows],
                                                      scale)  # fmt: skip
        return out

    def store_prompt_kv(self, slots, k, v):
        first = self.first_layer
        if first:
            self.dense.store_prompt_kv(slots, k[:first], v[:first])
        for layer, (layer_k, layer_v) in enumerate(zip(k[first:], v[first:], strict=True)):
            self.host.store(layer, layer_k, layer_v, slots)
            if self.algorithm.incremental:
                self.algorithm.append_chunk(layer, slots, layer_k, first_offset=0)
        self.counters.d2h_bytes += slots.numel() * self._offload_bytes_per_token

    def _append(self, layer, k):
        """Fold the step's keys into the algorithm's incremental summaries: the decode tokens in
        one call, each prefill chunk by itself (whole pages at once)."""
        slots = self.meta.slot_mapping  # [N]
        if not self._prefills:
            self.algorithm.append(layer, slots, k)
            return
        if self._step is not None:
            t = self._step.tokens
            self.algorithm.append(layer, slots[t], k[t])
        for _, start, n, context_len in self._prefills:
            rows = slice(start, start + n)
            first_offset = (context_len - n) % self.page_size
            self.algorithm.append_chunk(layer, slots[rows], k[rows], first_offset)

    def _prefill_held_in_hbm(self, layer, held_rows, q, k, v, scale):
        """Dense causal attention of a chunk over its context, kept in its prefill slots: the
        chunk's K/V written there, the prefix read from there (HBM)."""
        heads, _, _, d = self.gpu.k[layer].shape  # [Hkv, Q + 1, S, D]
        rows_k = self.gpu.k[layer].view(heads, -1, d).transpose(0, 1)  # [(Q + 1) * S, Hkv, D]
        rows_v = self.gpu.v[layer].view(heads, -1, d).transpose(0, 1)
        new = held_rows[-k.shape[0] :]  # [n] the chunk's own rows, after its prefix
        rows_k[new] = k
        rows_v[new] = v
        # token-major, as the dense layers gather it: the BSHD layout cuDNN's plan reuse
        # across lengths takes (TORCH_CUDNN_SDPA_AVOID_RECOMPILE, see paged_prefill_attention),
        # with strides that do not change with the context's length (a head-major copy's
        # changed with each chunk's page count, and each chunk waited ~50 ms for a new plan)
        ctx_k = rows_k.index_select(0, held_rows)  # [T, Hkv, D]
        ctx_v = rows_v.index_select(0, held_rows)
        return self._attend_prefill(q, ctx_k.transpose(0, 1), ctx_v.transpose(0, 1), scale)

    def _prefill(self, layer, b, q, k, v, context_len, scale):
        """Dense causal attention of a chunk over its prefix (read from the CPU tier)."""
        prefix = context_len - k.shape[0]
        ctx_k, ctx_v = k, v  # [n, Hkv, D]
        if prefix:
            prefix_pages = -(-prefix // self.page_size)
            pk, pv = self._prefix(layer, b, prefix_pages)  # [Hkv, p, S, D]
            # token-major (see _prefill_held_in_hbm): [T, Hkv, D]
            ctx_k = torch.cat([pk.flatten(1, 2)[:, :prefix].transpose(0, 1), k])
            ctx_v = torch.cat([pv.flatten(1, 2)[:, :prefix].transpose(0, 1), v])
            self.counters.h2d_bytes += prefix_pages * k.shape[1] * self.host.page_bytes
        return self._attend_prefill(q, ctx_k.transpose(0, 1), ctx_v.transpose(0, 1), scale)

    def _attend_prefill(self, q, ctx_k, ctx_v, scale):  # [n, Hq, D]; ctx: [Hkv, T, D]
        if self.on_cuda:
            from spin_ray.kernels.paged_prefill_attention import prefill_attention

            return prefill_attention(q, ctx_k, ctx_v, scale)
        return prefill_attention_ref(q, ctx_k, ctx_v, scale)

    def _prefix(self, layer, b, num_pages):  # 2 × [Hkv, p, S, D]
        """The first `num_pages` pages of chunk b's sequence in this layer, from the CPU tier:
        read ahead while the previous layer computed (if it did), and the next layer's read
        started now, so the prefix crosses PCIe while the GPU computes."""
        pending = self._prefix_reads.pop((layer, b), None)
        table = self.meta.page_table[b, :num_pages].long()
        if pending is None:
            pending = self.host.read_ahead(layer, table)
        if layer + 1 < self.host.k.shape[0]:
            self._prefix_reads[(layer + 1, b)] = self.host.read_ahead(layer + 1, table)
        return pending.result()

    @property
    def retrievals_per_layer(self) -> int:
        """Buffer retrievals an offloaded layer runs per decode step: its own, and with
        lookahead the predicted one (what the residency's free segments must cover)."""
        return 2 if self.lookahead else 1

    def lookahead_rows(self, layer_idx: int) -> torch.Tensor | None:  # [Bd] int64
        if not self.lookahead or self._step is None or layer_idx < self.first_layer:
            return None
        return self._step.tokens

    def prefetch(self, layer_idx, q):  # q: [Bd, Hq, D] predicted queries of the decode rows
        """Select the layer's pages with the predicted queries, place them in the buffer (the
        misses take LRU victims, the hits turn newest) and fetch the misses: on CUDA on the
        prefetch stream, which the layer's `_decode` waits for (the current layer's compute
        runs meanwhile); on the CPU at once. Its lookups do not count in the hit rate."""
        layer = layer_idx - self.first_layer
        step = self._step
        with self.timer.phase("fetch"):
            pages = self._select(layer, q, step, step.windows.prefetch_topk)
            _, dst = self._retrieve(layer, pages, step, self.counters.prefetch_counts)
            if not self.on_cuda:
                self._fetch(layer, layer, pages, dst, step, counted=True)
                return
            self.prefetch_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.prefetch_stream):
                programs = self.host.overlap_programs
                self._fetch(layer, layer, pages, dst, step, programs, counted=True)
                done = torch.cuda.Event()
                done.record()
            self._prefetched[layer] = (done, (pages, dst))  # alive until the join

    def _join_prefetch(self, layer: int) -> None:
        """Order the layer's work after its lookahead fetch (CUDA)."""
        entry = self._prefetched.pop(layer, None)
        if entry is not None:
            torch.cuda.current_stream(self.device).wait_event(entry[0])

    def _select(self, layer, q, step, topk=None):  # [B, Hkv, K] pages
        scores = self.algorithm.page_scores(layer, q, step.batch)  # [B, Hkv, maxp]
        return select_pages(scores, step.windows, topk)

    def _decode(self, layer, q, k, v, scale):
        step = self._step
        with self.timer.phase("select"):
            pages = self._select(layer, q, step)
        tier_layer = layer if self.retains else 0
        with self.timer.phase("fetch"):
            if self.retains:
                self._join_prefetch(layer)
                slots, dst = self._retrieve(layer, pages, step, self.counters.device_counts)
                self._fetch(layer, layer, pages, dst, step, counted=True)
            else:
                slots = self._stage(layer, pages, step)
            self.gpu.store_tokens(tier_layer, pages, slots, step.last_page, step.last_offset, k, v)
        with self.timer.phase("attention"):
            extra = self.algorithm.estimate(layer, q, step.batch, pages, scale)
            attend = sparse_decode_attention if self.on_cuda else sparse_decode_attention_ref
            k_slots, v_slots = self.gpu.k[tier_layer], self.gpu.v[tier_layer]
            return attend(q, k_slots, v_slots, slots, pages, step.context_lens, scale, extra)

    def _stage(self, layer, pages, step):  # [B, Hkv, K] slots
        """No buffer: every listed page is fetched into the request's slots, in list order."""
        valid = pages >= 0
        pos = valid.long().cumsum(-1) - 1  # [B, Hkv, K]
        b, h, k = pages.shape
        n = step.slot_lists.shape[1]
        listed = step.slot_lists.gather(1, pos.clamp(0, n - 1).view(b, h * k)).view(b, h, k)
        slots = torch.where(valid & (pos < n), listed, -1)
        if self.debug_checks and bool((valid & (slots < 0)).any()):
            raise RuntimeError("a request holds fewer GPU slots than its mandatory pages")
        self._fetch(layer, 0, pages, slots, step)
        self.counters.add_lookups(valid.sum(), 0)
        return slots

    def _retrieve(self, layer, pages, step, counts):  # 2 × [B, Hkv, K]: slots, dst
        """Look the pages up in the buffer and give each miss an LRU victim's slot: returns
        every page's slot and, for misses, the slot to fetch it into (-1 elsewhere); counts
        lookups, hits, evictions and the bytes to fetch into `counts` [4]."""
        if not (self.fused_retrieve and fits(pages.shape[2], step.slot_lists.shape[1])):
            return self._retrieve_torch(layer, pages, step, counts)
        residency = self.residency
        slots, dst = spin_retrieve(
            pages, step.rows, step.slot_lists, step.slot_counts, layer,
            residency.directory, residency.segments, residency.seg_count, residency.seg_home,
            residency.free_stack, residency.free_top,
            residency.slot_page[layer], residency.slot_bucket[layer],
            counts, self.lru_keys, residency.lru_buckets - 1, self.host.page_bytes,
        )  # fmt: skip
        if self.debug_checks and int(residency.free_top) < 0:
            raise RuntimeError("residency segments were not reserved for this step")
        return slots, dst

    def _retrieve_torch(self, layer, pages, step, counts):  # 2 × [B, Hkv, K]: slots, dst
        """`_retrieve` in torch operations (fixed shapes, no host sync): the reference of the
        fused kernels."""
        residency = self.residency
        b, h, k = pages.shape
        valid = pages >= 0
        slots = residency.lookup(step.rows, layer, pages)  # [B, Hkv, K]
        hit = slots >= 0
        miss = valid & ~hit
        counts[0] += valid.sum()
        counts[1] += hit.sum()

        # candidates: the request's slots in this (layer, head), keyed for the LRU
        cand = step.slot_lists  # [B, n]
        n = cand.shape[1]
        safe = cand.clamp(min=0)
        occupant = residency.slot_page[layer][:, safe].permute(1, 0, 2)  # [B, Hkv, n]
        bucket = residency.slot_bucket[layer][:, safe].permute(1, 0, 2)
        keys = torch.where(occupant < 0, 0, bucket.long() + 1)
        hit_pos = torch.where(hit, self._slot_pos[slots.clamp(min=0)], n)  # [B, Hkv, K]; n: none
        protect = torch.zeros(b, h, n + 1, dtype=torch.bool, device=self.device)
        protect = protect.scatter_(2, hit_pos, True)[..., :n] | (cand < 0)[:, None, :]
        keys = keys.masked_fill(protect, self.lru_keys - 1)
        need = miss.sum(-1)  # [B, Hkv]  <= unprotected slots: slots >= floor >= mandatory
        if self.debug_checks and bool((need > (~protect).sum(-1)).any()):
            raise RuntimeError("a request holds fewer GPU slots than its mandatory pages")
        victims = self._victims(keys.flatten(0, 1), need.flatten()).view(b, h, n)
        counts[2] += (victims & (occupant >= 0)).sum()

        # the r-th miss of each (sequence, head) row takes the row's r-th victim
        ranks = torch.arange(n, device=self.device).expand(b, h, n)
        victim_rank = torch.where(victims, victims.long().cumsum(-1) - 1, n)  # [B, Hkv, n]
        victim_at = torch.zeros(b, h, n + 1, dtype=torch.int64, device=self.device)
        victim_at.scatter_(2, victim_rank, ranks)  # [B, Hkv, n+1] list position of rank r
        miss_rank = torch.where(miss, miss.long().cumsum(-1) - 1, n)  # [B, Hkv, K]
        at = victim_at.gather(2, miss_rank)  # [B, Hkv, K]
        dst = torch.where(miss, cand.gather(1, at.view(b, h * k)).view(b, h, k), -1)
        heads = step.listed_heads  # [B * Hkv * K]
        residency.replace(layer, heads, dst.flatten(), pages.flatten(), miss.flatten())
        counts[3] += miss.sum() * self.host.page_bytes
        slots = torch.where(miss, dst, slots)
        residency.touch(layer, heads, slots.flatten(), valid.flatten())
        if self.debug_checks and int(residency.free_top) < 0:
            raise RuntimeError("residency segments were not reserved for this step")
        return slots, dst

    def _fetch(self, layer, tier_layer, pages, dst, step, programs=MAX_PROGRAMS, counted=False):
        """Copy page pages[b, h, j] of K/V head h into GPU slot dst[b, h, j] where dst >= 0
        (`counted`: the bytes are already counted; `programs`: `HostTier.fetch`'s)."""
        b, h, k = pages.shape
        table = step.batch.page_table  # [B, maxp] int32
        src = table.gather(1, pages.clamp(min=0).view(b, h * k)).view(b, h, k)
        gpu_k, gpu_v = self.gpu.k[tier_layer], self.gpu.v[tier_layer]
        self.host.fetch(
            layer, gpu_k, gpu_v, src.flatten(), step.listed_heads, dst.flatten(), programs
        )
        if not counted:
            self.counters.add_fetched_bytes((dst >= 0).sum() * self.host.page_bytes)

    def _victims(self, keys, need):
        if self.on_cuda:
            return lru_victims(keys.to(torch.uint8).contiguous(), need, self.lru_keys)
        return lru_victims_ref(keys, need, self.lru_keys)

    # ------------------------------------------------------------------ lifecycle

    def release(self, request_id: str) -> None:
        self._index.pop(request_id, None)
        self.algorithm.release(request_id)
        if self.dense is not None:
            self.dense.release(request_id)
