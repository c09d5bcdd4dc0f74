"""`retroinfer` (Chen et al., 2025): partition = k-means cluster of keys, per KV head, within
segments of `segment_tokens` tokens (about `cluster_tokens` tokens per
cluster); summary = centroid, value sum and size.

Variable-size partitions are laid out contiguously: `index` returns a permutation that puts
each cluster's tokens next to each other in the pages, so a cluster is a short run of pages.
The sink's pages are clustered on their own and keep their order (the runtime attends them by
page, so they must keep holding the first tokens; the local window is never indexed).
(Keys are post-RoPE and every stored token precedes the decode query, so reordering tokens
within a sequence's pages changes no attention result; positions are not needed afterwards.)

Score of cluster c for KV head h: Σ over the group's query heads of softmax_c(q·C_c/√d); a
page scores as its best cluster. Retrieval zone: the top pages within the token budget are
attended exactly. Estimation zone (optional): the next `estimation_fraction` of
clusters, among those with no token in an exactly attended page, contribute
exp(q·C_c·scale)·(value sum) over size·exp(q·C_c·scale) — each of their keys approximated by
its centroid — merged into the attention by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spin_ray.sparse.algorithms.base import Partial, SparseAlgorithm


@dataclass
class Clusters:
    """One request's clusters in one layer, for the tokens of its indexed pages."""

    centroids: torch.Tensor  # [Hkv, C, D] float32
    value_sums: torch.Tensor  # [Hkv, C, D] float32
    sizes: torch.Tensor  # [Hkv, C] float32 (0 = empty cluster)
    token_cluster: torch.Tensor  # [Hkv, T] int64 cluster of each stored token (laid-out order)


def kmeans(x: torch.Tensor, num_clusters: int, iters: int) -> torch.Tensor:  # [H, N] int64
    """Lloyd's k-means per head on x [H, N, D] (fp32), initialised with evenly spaced tokens
    (deterministic); returns each point's cluster."""
    h, n, d = x.shape
    start = torch.linspace(0, n - 1, num_clusters, device=x.device).round().long()
    centroids = x[:, start].clone()  # [H, C, D]
    assign = torch.cdist(x, centroids).argmin(-1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(h, n, d), x)
        counts = torch.zeros(h, num_clusters, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )
        means = sums / counts.clamp(min=1)[..., None]
        centroids = torch.where(counts[..., None] > 0, means, centroids)
        assign = torch.cdist(x, centroids).argmin(-1)
    return assign


def cluster_segment(
    k: torch.Tensor,  # [H, N, D]
    v: torch.Tensor,  # [H, N, D]
    num_clusters: int,
    iters: int,
    in_place: bool = False,
) -> tuple[torch.Tensor, Clusters]:
    """Cluster one segment: the permutation [H, N] grouping each cluster's tokens (clusters in
    id order, tokens in position order inside), and the clusters in that laid-out order. With
    `in_place` the tokens keep their order (the identity permutation; the sink's pages)."""
    h, n, d = k.shape
    kf, vf = k.float(), v.float()
    assign = kmeans(kf, num_clusters, iters)  # [H, N]
    if in_place:
        perm = torch.arange(n, device=k.device).expand(h, n)  # [H, N]
    else:
        perm = torch.sort(assign, dim=1, stable=True).indices  # [H, N]
    index = assign[..., None].expand(h, n, d)
    counts = torch.zeros(h, num_clusters, device=k.device).scatter_add_(
        1, assign, torch.ones_like(assign, dtype=torch.float32)
    )
    key_sums = torch.zeros(h, num_clusters, d, device=k.device).scatter_add_(1, index, kf)
    value_sums = torch.zeros(h, num_clusters, d, device=k.device).scatter_add_(1, index, vf)
    clusters = Clusters(
        centroids=key_sums / counts.clamp(min=1)[..., None],
        value_sums=value_sums,
        sizes=counts,
        token_cluster=assign.gather(1, perm),
    )
    return perm, clusters


class RetroInfer(SparseAlgorithm):
    name = "retroinfer"

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        self.state: dict[str, list[Clusters | None]] = {}

    def index(self, layer, request_id, first_page, page_ids, k, v):
        hkv, n, s, d = k.shape
        layers = self.state.setdefault(request_id, [None] * self.geometry.num_layers)
        kt, vt = k.reshape(hkv, n * s, d), v.reshape(hkv, n * s, d)
        seg = self.config.segment_tokens
        sink_end = -(-self.geometry.sink_tokens // s) * s  # the sink's pages stay in order
        start = first_page * s
        perms, pieces = [], []
        pos = start
        while pos < start + n * s:  # split the run at segment boundaries and the sink's end
            end = min(start + n * s, (pos // seg + 1) * seg)
            if pos < sink_end:
                end = min(end, sink_end)
            num = max(1, (end - pos) // self.config.cluster_tokens)
            a, b = pos - start, end - start
            perm, clusters = cluster_segment(
                kt[:, a:b], vt[:, a:b], num, self.config.kmeans_iters, pos < sink_end
            )
            perms.append(perm + a)
            pieces.append(clusters)
            pos = end
        old = layers[layer]
        offset = 0 if old is None else old.sizes.shape[1]
        for clusters in pieces:
            clusters.token_cluster += offset
            offset += clusters.sizes.shape[1]
        parts = ([old] if old is not None else []) + pieces
        layers[layer] = Clusters(
            centroids=torch.cat([c.centroids for c in parts], 1),
            value_sums=torch.cat([c.value_sums for c in parts], 1),
            sizes=torch.cat([c.sizes for c in parts], 1),
            token_cluster=torch.cat([c.token_cluster for c in parts], 1),
        )
        return torch.cat(perms, 1)

    def cluster_scores(self, q: torch.Tensor, clusters: Clusters) -> torch.Tensor:  # [Hkv, C]
        """Σ over the group's query heads of softmax over clusters of q·C/√d (q: [Hq, D])."""
        hkv, _, d = clusters.centroids.shape
        qg = q.float().view(hkv, -1, d)  # [Hkv, G, D]
        logits = torch.einsum("hgd,hcd->hgc", qg, clusters.centroids) / math.sqrt(d)
        logits = logits.masked_fill(clusters.sizes[:, None, :] == 0, float("-inf"))
        return torch.softmax(logits, -1).sum(1)

    def page_scores(self, layer, q, batch):
        b, maxp = batch.page_table.shape
        s = self.geometry.page_size
        out = torch.zeros(b, self.geometry.num_kv_heads, maxp, device=q.device)
        for i, request_id in enumerate(batch.request_ids):
            indexed = batch.indexed_pages_cpu[i]
            if not indexed:
                continue
            clusters = self.state[request_id][layer]
            per_token = self.cluster_scores(q[i], clusters).gather(1, clusters.token_cluster)
            out[i, :, :indexed] = per_token.view(-1, indexed, s).amax(-1)
        return out

    def estimate(self, layer, q, batch, pages, scale) -> Partial | None:
        fraction = self.config.estimation_fraction
        if fraction == 0:
            return None
        b, hq, d = q.shape
        hkv, s = self.geometry.num_kv_heads, self.geometry.page_size
        m = torch.full((b, hq), float("-inf"), device=q.device)
        lsum = torch.zeros(b, hq, device=q.device)
        acc = torch.zeros(b, hq, d, device=q.device)
        for i, request_id in enumerate(batch.request_ids):
            indexed = batch.indexed_pages_cpu[i]
            if not indexed:
                continue
            clusters = self.state[request_id][layer]
            num = int(fraction * clusters.sizes.shape[1])
            if num == 0:
                continue
            exact = torch.zeros(hkv, indexed + 1, dtype=torch.float32, device=q.device)
            listed = pages[i].clamp(max=indexed)  # pages past the index land in a spare column
            exact.scatter_(1, torch.where(pages[i] >= 0, listed, indexed), 1.0)
            touched = torch.zeros_like(clusters.sizes).scatter_add_(
                1, clusters.token_cluster, exact[:, :indexed].repeat_interleave(s, 1)
            )
            eligible = (touched == 0) & (clusters.sizes > 0)
            scores = self.cluster_scores(q[i], clusters).masked_fill(~eligible, float("-inf"))
            top_scores, top = scores.topk(min(num, scores.shape[1]), -1)  # [Hkv, n]
            valid = top_scores > float("-inf")
            centroids = clusters.centroids.gather(1, top[..., None].expand(-1, -1, d))
            value_sums = clusters.value_sums.gather(1, top[..., None].expand(-1, -1, d))
            sizes = clusters.sizes.gather(1, top)
            qg = q[i].float().view(hkv, -1, d)
            logits = torch.einsum("hgd,hnd->hgn", qg, centroids) * scale
            logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
            mi = logits.amax(-1)  # [Hkv, G]
            p = torch.exp(logits - torch.where(torch.isfinite(mi), mi, 0)[..., None])
            m[i] = mi.reshape(hq)
            lsum[i] = (p * sizes[:, None, :]).sum(-1).reshape(hq)
            acc[i] = torch.einsum("hgn,hnd->hgd", p, value_sums).reshape(hq, d)
        return m, lsum, acc

    def release(self, request_id):
        self.state.pop(request_id, None)
