"""Prefill of the offloaded layers: each chunk attends densely and causally over its context.

Its prefix is kept in HBM, in prefill slots the manager gives a request at its first chunk
(`TieredCacheManager.hold_prefill`: one per prompt page, while free slots and others' buffer
excess allow; given back at its first decode step), or else read back from the CPU tier — each
layer's read started on the host's side stream while the layer before it computes: a PCIe read
of the whole prefix per chunk, quadratic in the prompt length. Without a buffer (the GPU tier a
one-layer staging area) every prefix is read from the CPU tier.
"""

from __future__ import annotations

import torch

from spin_ray.attention.metadata import AttentionMetadata, PrefillChunk, StepSplit
from spin_ray.device.step_buffers import to_device_async
from spin_ray.kernels.paged_attention_ref import prefill_attention_ref
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.stats import KVCounters
from spin_ray.sparse.tiers import DeviceTier, HostTier, PendingRead


class PrefillAttention:
    def __init__(
        self,
        manager: TieredCacheManager,
        host: HostTier,
        gpu: DeviceTier,
        counters: KVCounters,
        holds_prefix: bool,
    ):
        self.manager = manager
        self.host = host
        self.gpu = gpu
        self.counters = counters
        self.page_size = manager.page_size
        self.holds_prefix = holds_prefix
        """Whether chunks may keep their context in HBM prefill slots (a GPU tier of every
        offloaded layer: the "spin" mode)."""
        self.on_cuda = gpu.k.device.type == "cuda"
        self.meta: AttentionMetadata | None = None
        self.chunks: list[PrefillChunk] = []
        """The step's prefill chunks."""
        self._held: list[torch.Tensor | None] = []
        """Per chunk whose request's context is kept in HBM prefill slots: [T] int64
        slot * S + offset of each context position (the prefix, then the chunk's tokens), in a
        layer's [(Q + 1) * S] rows of one head; None: the prefix is read from the CPU tier."""
        self._prefix_reads: dict[tuple[int, int], PendingRead] = {}
        """(layer, chunk index) → its prefix, being read ahead on the host's side stream."""
        self._read_prefixes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """(layer, chunk index) → its prefix, already read (by `context_kv`) for the layer's
        attention, which takes it (so a prefix crosses PCIe once per layer)."""

    def plan(self, meta: AttentionMetadata, split: StepSplit) -> None:
        """A request's first decode step ends its prefill (its prefill slots go back); the
        step's chunks take their prefill slots."""
        self.meta = meta
        if self.manager.prefill_slots:
            for b in split.decode_seqs[: len(split.decode_seqs) - meta.num_padded]:
                self.manager.end_prefill(meta.request_ids[b])
        self.chunks = split.prefills
        self._held = [self._held_rows(meta, chunk) for chunk in split.prefills]
        self._prefix_reads.clear()
        self._read_prefixes.clear()

    def _held_rows(self, meta: AttentionMetadata, chunk: PrefillChunk) -> torch.Tensor | None:
        """The rows of the chunk's context in HBM prefill slots ([T] int64), the slots taken
        at its request's first chunk when more chunks follow; None (read any prefix from the
        CPU tier) when there were not enough slots, or when prefixes are not held."""
        if not self.holds_prefix:
            return None
        b, _, n, context_len = chunk
        request_id, prefix, s = meta.request_ids[b], context_len - n, self.page_size
        held = self.manager.prefill_slots.get(request_id)
        if held is None and prefix == 0 and context_len < self.manager.tokens[request_id]:
            held = self.manager.hold_prefill(request_id)  # a first chunk, more to come
        num_pages = -(-context_len // s)
        if held is None or len(held) < num_pages:
            return None
        device = self.gpu.k.device
        slots = to_device_async(torch.tensor(held[:num_pages], dtype=torch.int64), device)
        pos = torch.arange(context_len, device=device)  # [T]
        return slots[pos // s] * s + pos % s  # [T]

    def forward(
        self,
        layer: int,  # offloaded layer
        q: torch.Tensor,  # [N, Hq, D] the whole step's
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,
        scale: float,
        out: torch.Tensor,  # [N, Hq, D] the chunks' rows are written
    ) -> None:
        for (b, start, n, ctx), held in zip(self.chunks, self._held, strict=True):
            rows = slice(start, start + n)
            if held is None:
                out[rows] = self._over_cpu_prefix(layer, b, q[rows], k[rows], v[rows], ctx, scale)
            else:
                out[rows] = self._over_held_context(layer, held, q[rows], k[rows], v[rows],
                                                    scale)  # fmt: skip

    def _over_held_context(self, layer, held_rows, q, k, v, scale):
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
        return self.attend(q, ctx_k.transpose(0, 1), ctx_v.transpose(0, 1), scale)

    def _over_cpu_prefix(self, layer, b, q, k, v, context_len, scale):
        """Dense causal attention of a chunk over its prefix (read from the CPU tier)."""
        prefix = context_len - k.shape[0]
        ctx_k, ctx_v = k, v  # [n, Hkv, D]
        if prefix:
            prefix_pages = -(-prefix // self.page_size)
            pk, pv = self._prefix(layer, b, prefix_pages)  # [Hkv, p, S, D]
            # token-major (see _over_held_context): [T, Hkv, D]
            ctx_k = torch.cat([pk.flatten(1, 2)[:, :prefix].transpose(0, 1), k])
            ctx_v = torch.cat([pv.flatten(1, 2)[:, :prefix].transpose(0, 1), v])
            self.counters.h2d_bytes += prefix_pages * k.shape[1] * self.host.page_bytes
        return self.attend(q, ctx_k.transpose(0, 1), ctx_v.transpose(0, 1), scale)

    def context_kv(
        self, layer: int, chunk: int, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # 2 × [end - start, Hkv, D]
        """K/V of positions start..end-1 of the step's chunk `chunk`'s sequence, all stored
        before the chunk: from its prefill slots (HBM) if it holds them, else from the prefix
        the chunk's attention reads from the CPU tier (read now, kept for that attention)."""
        held = self._held[chunk]
        if held is not None:  # (held only with a GPU tier of every offloaded layer)
            heads, _, _, d = self.gpu.k[layer].shape  # [Hkv, Q + 1, S, D]
            rows = held[start:end]  # [m]
            return tuple(
                t[layer].view(heads, -1, d)[:, rows].transpose(0, 1)
                for t in (self.gpu.k, self.gpu.v)
            )
        b, _, n, context_len = self.chunks[chunk]
        prefix = self._prefix(layer, b, -(-(context_len - n) // self.page_size))
        self._read_prefixes[(layer, b)] = prefix  # [Hkv, p, S, D] each
        return tuple(t.flatten(1, 2)[:, start:end].transpose(0, 1) for t in prefix)

    def attend(self, q, ctx_k, ctx_v, scale):  # [n, Hq, D]; ctx: [Hkv, T, D]
        """Causal attention of the chunk's queries over its context (the chunk last)."""
        if self.on_cuda:
            from spin_ray.kernels.paged_prefill_attention import prefill_attention

            return prefill_attention(q, ctx_k, ctx_v, scale)
        return prefill_attention_ref(q, ctx_k, ctx_v, scale)

    def _prefix(self, layer, b, num_pages):  # 2 × [Hkv, p, S, D]
        """The first `num_pages` pages of chunk b's sequence in this layer, from the CPU tier:
        read ahead while the previous layer computed (if it did), and the next layer's read
        started now, so the prefix crosses PCIe while the GPU computes (or, once
        `context_kv` read it, that read)."""
        read = self._read_prefixes.pop((layer, b), None)
        if read is not None:
            return read
        pending = self._prefix_reads.pop((layer, b), None)
        table = self.meta.page_table[b, :num_pages].long()
        if pending is None:
            pending = self.host.read_ahead(layer, table)
        if layer + 1 < self.host.k.shape[0]:
            self._prefix_reads[(layer + 1, b)] = self.host.read_ahead(layer + 1, table)
        return pending.result()
