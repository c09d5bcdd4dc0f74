"""`shadowkv` (Sun et al., 2024), its sparse selection: partition = chunk of 8 tokens;
summary (landmark) = mean of the chunk's post-RoPE keys; score of a chunk for a KV head =
max over the group's query heads of softmax over the indexed chunks of q·L/√d. A page's score
is its best chunk's. (ShadowKV's low-rank key reconstruction and outlier chunks are not used:
the CPU tier keeps exact keys.)"""

from __future__ import annotations

import math

import torch

from spin_ray.sparse.algorithms.base import SparseAlgorithm


class ShadowKV(SparseAlgorithm):
    name = "shadowkv"

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        g = geometry
        self.chunk = config.chunk_size
        self.chunks_per_page = g.page_size // self.chunk
        shape = (g.num_layers, g.num_cpu_pages, g.num_kv_heads, self.chunks_per_page, g.head_dim)
        self.landmarks = torch.zeros(shape, dtype=g.dtype, device=g.device)  # [L, P, Hkv, C, D]

    def index(self, layer, request_id, first_page, page_ids, k, v):
        hkv, n, s, d = k.shape
        chunks = k.float().view(hkv, n, self.chunks_per_page, self.chunk, d).mean(3)
        self.landmarks[layer, page_ids] = chunks.transpose(0, 1).to(self.landmarks.dtype)
        return None

    def page_scores(self, layer, q, batch):
        b, hq, d = q.shape
        hkv, maxp = self.geometry.num_kv_heads, batch.page_table.shape[1]
        lm = self.landmarks[layer][batch.page_table.long()].float()  # [B, maxp, Hkv, C, D]
        qg = q.float().view(b, hkv, hq // hkv, d)
        logits = torch.einsum("bhgd,bphcd->bhgpc", qg, lm) / math.sqrt(d)  # [B, Hkv, G, P, C]
        indexed = torch.arange(maxp, device=q.device) < batch.indexed_pages[:, None]  # [B, P]
        logits = logits.masked_fill(~indexed[:, None, None, :, None], float("-inf"))
        probs = torch.softmax(logits.flatten(3), -1).view_as(logits).nan_to_num(0.0)
        return probs.amax(2).amax(-1)  # [B, Hkv, P]
