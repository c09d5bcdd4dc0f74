"""`quest` (Tang et al., 2024): partition = page; summary = elementwise min and max of the
page's keys; score = Σ_d max(q_d · max_d, q_d · min_d), an upper bound of q·k over the page.
With GQA a KV head serves G query heads, so its page score is the largest of theirs (still an
upper bound of every q·k of the group).

The summaries are incremental: every stored key is folded into its page's min and max as it is
written (prefill chunks and decode tokens alike, on the device, in CUDA graphs too), so no
step ever reads pages back from the CPU tier to index them and every complete page is scored."""

from __future__ import annotations

import torch

from spin_ray.kernels.quest_append import quest_append, quest_append_chunk, quest_append_ref
from spin_ray.kernels.quest_page_scores import quest_page_scores, quest_page_scores_ref
from spin_ray.sparse.algorithms.base import SparseAlgorithm


class Quest(SparseAlgorithm):
    name = "quest"
    graph_safe = True

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        g = geometry
        # row P is the spare that the CPU reference's padding tokens (slot -1) write
        shape = (g.num_layers, g.num_cpu_pages + 1, g.num_kv_heads, g.head_dim)
        self.kmin = torch.zeros(shape, dtype=g.dtype, device=g.device)  # [L, P + 1, Hkv, D]
        self.kmax = torch.zeros(shape, dtype=g.dtype, device=g.device)

    def append(self, layer, slots, k, v, positions):
        fold = quest_append if k.is_cuda else quest_append_ref
        fold(self.kmin[layer], self.kmax[layer], slots, k, self.geometry.page_size)

    def append_chunk(self, layer, slots, k, v, first_position, positions):
        s = self.geometry.page_size
        quest_append_chunk(self.kmin[layer], self.kmax[layer], slots, k, s, first_position % s)

    def page_scores(self, layer, q, batch):
        score = quest_page_scores if q.is_cuda else quest_page_scores_ref
        return score(q, self.kmin[layer], self.kmax[layer], batch.page_table, batch.num_pages)
