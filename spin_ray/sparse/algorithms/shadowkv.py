"""`shadowkv` (Sun et al., 2024), its sparse selection: partition = chunk of 8 tokens;
summary (landmark) = mean of the chunk's post-RoPE keys; score of a chunk for a KV head =
max over the group's query heads of softmax over the indexed chunks of q·L/√d. A page's score
is its best chunk's. The landmarks are incremental: a prefill chunk's keys join their chunks'
means as they are stored, each decode token its chunk's running mean, so no step reads pages
back from the CPU tier to index them. (ShadowKV's low-rank key reconstruction and outlier
chunks are not used: the CPU tier keeps exact keys; docs/algorithms.md says why.)"""

from __future__ import annotations

import math

import torch

from spin_ray.sparse.algorithms.base import SparseAlgorithm
from spin_ray.sparse.algorithms.runs import runs_of


class ShadowKV(SparseAlgorithm):
    name = "shadowkv"
    graph_safe = True

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        g = geometry
        self.chunk = config.chunk_size
        self.chunks_per_page = g.page_size // self.chunk
        self.spare = g.num_cpu_pages  # the row padding tokens (slot -1) write
        shape = (
            g.num_layers,
            g.num_cpu_pages + 1,
            g.num_kv_heads,
            self.chunks_per_page,
            g.head_dim,
        )
        self.landmarks = torch.zeros(shape, dtype=g.dtype, device=g.device)  # [L, P + 1, Hkv, C, D]

    def append(self, layer, slots, k, v, positions):
        """Decode tokens (one per sequence): each key joins its chunk's running mean,
        m ← m + (k − m) / (j + 1) at offset j in the chunk (j = 0 starts the chunk afresh), on
        the device without synchronising."""
        pages, chunks, offsets = self._chunk_of(slots)  # [N] each
        table = self.landmarks[layer]  # [P + 1, Hkv, C, D]
        old = table[pages, :, chunks].float()  # [N, Hkv, D]
        key = k.float()
        j = offsets.float()[:, None, None]
        new = torch.where(j == 0, key, old + (key - old) / (j + 1))
        table[pages, :, chunks] = new.to(table.dtype)

    def append_chunk(self, layer, slots, k, v, first_position, positions):
        """A prefill chunk of one sequence (eager): each chunk it touches gets the mean of its
        earlier tokens' landmark and the new keys, (m · j0 + Σ k) / (j0 + n)."""
        runs = runs_of(k, first_position % self.chunk, self.chunk)  # per landmark chunk
        pages, chunks, _ = self._chunk_of(slots[runs.firsts])  # [G] each
        table = self.landmarks[layer]
        table[pages, :, chunks] = runs.means(table[pages, :, chunks]).to(table.dtype)

    def _chunk_of(self, slots):  # [N] int64 -> ([N] page row, [N] chunk, [N] offset in chunk)
        size = self.geometry.page_size
        in_page = slots % size
        pages = torch.where(slots >= 0, slots // size, self.spare)
        return pages, in_page // self.chunk, in_page % self.chunk

    def page_scores(self, layer, q, batch):
        b, hq, d = q.shape
        hkv, maxp = self.geometry.num_kv_heads, batch.page_table.shape[1]
        lm = self.landmarks[layer][batch.page_table.long()]  # [B, maxp, Hkv, C, D]
        qg = q.view(b, hkv, hq // hkv, d).to(lm.dtype)
        logits = torch.einsum("bhgd,bphcd->bhgpc", qg, lm).float() / math.sqrt(d)  # [B,Hkv,G,P,C]
        indexed = torch.arange(maxp, device=q.device) < batch.indexed_pages[:, None]  # [B, P]
        logits = logits.masked_fill(~indexed[:, None, None, :, None], float("-inf"))
        probs = torch.softmax(logits.flatten(3), -1).view_as(logits).nan_to_num(0.0)
        return probs.amax(2).amax(-1)  # [B, Hkv, P]
