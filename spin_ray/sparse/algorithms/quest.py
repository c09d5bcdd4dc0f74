"""`quest` (Tang et al., 2024): partition = page; summary = elementwise min and max of the
page's keys; score = Σ_d max(q_d · max_d, q_d · min_d), an upper bound of q·k over the page.
With GQA a KV head serves G query heads, so its page score is the largest of theirs (still an
upper bound of every q·k of the group)."""

from __future__ import annotations

import torch

from spin_ray.kernels.quest_page_scores import quest_page_scores, quest_page_scores_ref
from spin_ray.sparse.algorithms.base import SparseAlgorithm


class Quest(SparseAlgorithm):
    name = "quest"
    graph_safe = True

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        g = geometry
        shape = (g.num_layers, g.num_cpu_pages, g.num_kv_heads, g.head_dim)
        self.kmin = torch.zeros(shape, dtype=g.dtype, device=g.device)  # [L, P, Hkv, D]
        self.kmax = torch.zeros(shape, dtype=g.dtype, device=g.device)

    def index(self, layer, request_id, first_page, page_ids, k, v):
        self.kmin[layer, page_ids] = k.amin(2).transpose(0, 1)  # [n, Hkv, D]
        self.kmax[layer, page_ids] = k.amax(2).transpose(0, 1)
        return None

    def page_scores(self, layer, q, batch):
        score = quest_page_scores if q.is_cuda else quest_page_scores_ref
        return score(q, self.kmin[layer], self.kmax[layer], batch.page_table)
