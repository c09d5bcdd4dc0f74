"""`full`: every page is attended (the dense-offload baseline); nothing to index or score."""

from __future__ import annotations

import torch

from spin_ray.sparse.algorithms.base import SparseAlgorithm


class FullSelection(SparseAlgorithm):
    name = "full"
    graph_safe = True

    def append(self, layer, slots, k, v, positions):
        pass  # no summaries

    def append_chunk(self, layer, slots, k, v, first_position, positions):
        pass

    def page_scores(self, layer, q, batch):
        b, maxp = batch.page_table.shape
        return torch.zeros(b, self.geometry.num_kv_heads, maxp, device=q.device)
