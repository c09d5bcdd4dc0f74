"""`retroinfer` (Chen et al., 2025): partition = k-means cluster of keys, per KV head, within
segments of `segment_tokens` tokens (about `cluster_tokens` tokens per cluster); summary =
centroid, mean value and size.

The index is built during prefill on the device: once a prefill chunk completes a segment
(`layout_tokens`; the prompt's last one up to its local window), the runtime hands the
segment's K/V to `lay_out`, which clusters it and returns the order that lays each cluster's
tokens next to each other; the runtime stores the segment that way, so a cluster is a short run
of pages, and the clusters do not depend on how the prompt was cut into chunks. Until its
segment is laid out, and for good in the sink's pages, the prompt's local window (attended by
page, so kept in place) and the pages decode tokens fill, each page is one cluster of its own
tokens (centroid = their running mean). (Keys are post-RoPE and every stored token precedes the
decode query, so reordering tokens within a sequence's pages changes no attention result.)

Clusters live in rows beside the pages of the CPU tier — `rows_per_page` = ⌈S / cluster_tokens⌉
rows per page, a cluster in a row of the first page of its run — so they need no allocator and
go with their pages. Cluster c of a request, numbered `home logical page · rows_per_page +
row`, and the tokens of a page belong to the consecutive clusters `ranges[page]` = [lo, hi].
Everything below is vectorised over the batch's requests, reads only device tensors and never
synchronises (CUDA graphs).

Score of cluster c for KV head h: Σ over the group's query heads of softmax_c(q·C_c/√d) over
the request's non-empty clusters of indexed pages; a page scores as its best cluster.
Retrieval zone: the top pages within the token budget are attended exactly. Estimation zone
(optional): the best `estimation_fraction` of a head's clusters, among those with no token in
an exactly attended page, contribute Σ size·e^{q·C·scale}·mean value over Σ size·e^{q·C·scale}
(each of their keys approximated by the centroid), merged into the attention by log-sum-exp.
"""

from __future__ import annotations

import math

import torch

from spin_ray.sparse.algorithms.base import Partial, SparseAlgorithm
from spin_ray.sparse.algorithms.runs import runs_of


def kmeans(x: torch.Tensor, num_clusters: int, iters: int) -> torch.Tensor:  # [H, N] int64
    """Lloyd's k-means per head on x [H, N, D] (fp32), initialised with evenly spaced tokens
    (deterministic); returns each point's cluster (the nearest centroid: argmax of
    2·x·c − |c|², one batched matrix product)."""
    h, n, d = x.shape
    start = torch.linspace(0, n - 1, num_clusters, device=x.device).round().long()
    centroids = x[:, start].clone()  # [H, C, D]

    def nearest(c):  # [H, C, D] -> [H, N]
        return torch.baddbmm(-(c * c).sum(-1)[:, None], x, c.transpose(1, 2), alpha=2).argmax(-1)

    assign = nearest(centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(h, n, d), x)
        counts = torch.zeros(h, num_clusters, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )
        means = sums / counts.clamp(min=1)[..., None]
        centroids = torch.where(counts[..., None] > 0, means, centroids)
        assign = nearest(centroids)
    return assign


class RetroInfer(SparseAlgorithm):
    name = "retroinfer"
    graph_safe = True

    def __init__(self, geometry, config):
        super().__init__(geometry, config)
        g = geometry
        self.layout_tokens = config.segment_tokens
        self.rows_per_page = -(-g.page_size // config.cluster_tokens)
        self.spare = g.num_cpu_pages  # the page padding tokens (slot -1) write
        r, pages = self.rows_per_page, g.num_cpu_pages + 1
        self.centroids = torch.zeros(
            (g.num_layers, pages, r, g.num_kv_heads, g.head_dim), dtype=g.dtype, device=g.device
        )  # [L, P + 1, R, Hkv, D]
        self.value_means = torch.zeros_like(self.centroids)  # [L, P + 1, R, Hkv, D]
        self.sizes = torch.zeros(
            (g.num_layers, pages, r, g.num_kv_heads), device=g.device
        )  # [L, P + 1, R, Hkv] fp32, 0 = no cluster
        self.ranges = torch.zeros(
            (g.num_layers, pages, g.num_kv_heads, 2), dtype=torch.int64, device=g.device
        )  # [L, P + 1, Hkv, 2] the first and last cluster a page's tokens belong to
        self._scored: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """(layer, query, cluster scores, clusters) of the last `page_scores`: the step's
        `estimate` of that layer and query reuses them instead of scoring again."""

    # ------------------------------------------------------------------ summaries

    def append(self, layer, slots, k, v, positions):
        """Decode tokens (one per sequence): each joins its page's own cluster (row 0) as a
        running mean, m ← m + (x − m) / (j + 1) at offset j (j = 0 starts the page afresh)."""
        s = self.geometry.page_size
        pages = torch.where(slots >= 0, slots // s, self.spare)  # [N]
        j = (slots % s).float()[:, None, None]  # [N, 1, 1]
        for table, x in ((self.centroids, k), (self.value_means, v)):
            old = table[layer, pages, 0].float()  # [N, Hkv, D]
            new = torch.where(j == 0, x.float(), old + (x.float() - old) / (j + 1))
            table[layer, pages, 0] = new.to(table.dtype)
        sizes = self.sizes[layer, pages]  # [N, R, Hkv]
        sizes = torch.where(j == 0, 0.0, sizes)  # a fresh page: no other row holds a cluster
        sizes[:, 0] = j[:, 0] + 1
        self.sizes[layer, pages] = sizes
        own = (positions // s * self.rows_per_page)[:, None, None]  # [N, 1, 1]
        self.ranges[layer, pages] = own.expand(-1, self.geometry.num_kv_heads, 2)

    def append_chunk(self, layer, slots, k, v, first_position, positions):
        """A prefill chunk: every page it touches gets its tokens folded into its own cluster
        (row 0, running mean), (m·j0 + Σx)/(j0 + n), until its segment is laid out."""
        s = self.geometry.page_size
        runs_k, runs_v = runs_of(k, first_position % s, s), runs_of(v, first_position % s, s)
        pages = slots[runs_k.firsts] // s  # [G]
        for table, runs in ((self.centroids, runs_k), (self.value_means, runs_v)):
            table[layer, pages, 0] = runs.means(table[layer, pages, 0]).to(table.dtype)
        fresh = runs_k.before[:, :, 0] == 0  # [G, 1]: no token of the page stored before
        sizes = torch.where(fresh[:, :, None], 0.0, self.sizes[layer, pages])  # [G, R, Hkv]
        sizes[:, 0] = (runs_k.before + runs_k.counts)[:, :, 0]
        self.sizes[layer, pages] = sizes
        logical = first_position // s + torch.arange(len(pages), device=k.device)  # [G]
        self.ranges[layer, pages] = (logical * self.rows_per_page)[:, None, None].expand(
            -1, self.geometry.num_kv_heads, 2
        )

    def lay_out(self, layer, page_ids, first_page, k, v):
        """k-means over a segment's whole pages (m tokens): the order grouping each cluster's
        tokens (clusters in id order, tokens in position order inside), and the clusters
        written to the rows of its pages (cluster c in row c mod R of its page c // R)."""
        m, hkv, d = k.shape
        r, s = self.rows_per_page, self.geometry.page_size
        num = max(1, m // self.config.cluster_tokens)
        kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)  # [Hkv, m, D]
        assign = kmeans(kf, num, self.config.kmeans_iters)  # [Hkv, m]
        perm = torch.sort(assign, dim=1, stable=True).indices  # [Hkv, m]
        index = assign[..., None].expand(hkv, m, d)
        counts = torch.zeros(hkv, num, device=k.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )  # [Hkv, C]
        means = counts.clamp(min=1)[..., None]
        key_means = torch.zeros(hkv, num, d, device=k.device).scatter_add_(1, index, kf) / means
        value_means = torch.zeros(hkv, num, d, device=k.device).scatter_add_(1, index, vf) / means
        cluster = torch.arange(num, device=k.device)  # [C]
        home, row = page_ids[cluster // r], cluster % r  # [C] each
        self.sizes[layer, page_ids] = 0.0
        self.sizes[layer, home, row] = counts.T
        self.centroids[layer, home, row] = key_means.transpose(0, 1).to(self.centroids.dtype)
        self.value_means[layer, home, row] = value_means.transpose(0, 1).to(self.centroids.dtype)
        laid_out = assign.gather(1, perm).view(hkv, -1, s)  # [Hkv, pages, S] cluster per row
        ends = torch.stack([laid_out[..., 0], laid_out[..., -1]], -1)  # [Hkv, pages, 2]
        self.ranges[layer, page_ids] = (first_page * r + ends).transpose(0, 1)
        return perm.T  # [m, Hkv]

    # ------------------------------------------------------------------ scores

    def _cluster_scores(self, layer, q, batch):
        """Σ over the group's query heads of softmax over the request's clusters of q·C/√d
        ([B, Hkv, maxp·R], 0 for no cluster), and which clusters exist ([B, Hkv, maxp·R])."""
        b, hq, d = q.shape
        hkv, r = self.geometry.num_kv_heads, self.rows_per_page
        table = batch.page_table.long()  # [B, maxp]
        maxp = table.shape[1]
        centroids = self.centroids[layer][table]  # [B, maxp, R, Hkv, D]
        sizes = self.sizes[layer][table]  # [B, maxp, R, Hkv]
        indexed = torch.arange(maxp, device=q.device) < batch.indexed_pages[:, None]  # [B, maxp]
        valid = (sizes > 0) & indexed[:, :, None, None]
        valid = valid.permute(0, 3, 1, 2).reshape(b, hkv, maxp * r)  # [B, Hkv, C]
        qg = q.view(b, hkv, hq // hkv, d).to(centroids.dtype)
        logits = torch.einsum("bhgd,bprhd->bhgpr", qg, centroids).float() / math.sqrt(d)
        logits = logits.reshape(b, hkv, hq // hkv, maxp * r).masked_fill(
            ~valid[:, :, None], float("-inf")
        )
        scores = torch.softmax(logits, -1).nan_to_num(0.0).sum(2)  # [B, Hkv, C]
        return scores, valid

    def _page_clusters(self, layer, pages_cpu, num_clusters):
        """The clusters the tokens of each (page, head) belong to: [B, Hkv, n, S] request
        cluster ids, from `ranges` (pages_cpu: [B, Hkv or 1, n] CPU-tier pages)."""
        heads = torch.arange(self.geometry.num_kv_heads, device=pages_cpu.device)[:, None]
        ranges = self.ranges[layer][pages_cpu, heads]  # [B, Hkv, n, 2]
        step = torch.arange(self.geometry.page_size, device=ranges.device)
        ids = torch.minimum(ranges[..., :1] + step, ranges[..., 1:])  # [B, Hkv, n, S]
        return ids.clamp(0, num_clusters - 1)

    def page_scores(self, layer, q, batch):
        scores, valid = self._cluster_scores(layer, q, batch)  # [B, Hkv, C]
        self._scored = (layer, q, scores, valid)
        ids = self._page_clusters(layer, batch.page_table.long()[:, None], scores.shape[-1])
        per_page = scores.gather(2, ids.flatten(2)).view(ids.shape)  # [B, Hkv, maxp, S]
        return per_page.amax(-1)  # [B, Hkv, maxp]

    def estimate(self, layer, q, batch, pages, scale) -> Partial | None:
        fraction = self.config.estimation_fraction
        if fraction == 0:
            return None
        b, hq, d = q.shape
        hkv, r = self.geometry.num_kv_heads, self.rows_per_page
        scored = self._scored
        if scored is not None and scored[0] == layer and scored[1] is q:
            scores, valid = scored[2:]
        else:
            scores, valid = self._cluster_scores(layer, q, batch)  # [B, Hkv, C]
        c = scores.shape[-1]
        table = batch.page_table.long()  # [B, maxp]
        # clusters with a token in an exactly attended page are attended exactly
        exact = pages.clamp(min=0)  # [B, Hkv, K]
        exact_cpu = table.gather(1, exact.flatten(1)).view_as(exact)  # [B, Hkv, K]
        ids = self._page_clusters(layer, exact_cpu, c)  # [B, Hkv, K, S]
        heads = torch.arange(hkv, device=q.device)
        listed = (pages >= 0)[..., None].expand_as(ids).float()
        touched = torch.zeros(b, hkv, c, device=q.device).scatter_add_(
            2, ids.flatten(2), listed.flatten(2)
        )
        eligible = valid & (touched == 0)
        wanted = (fraction * valid.sum(-1)).floor()  # [B, Hkv] the zone's size
        width = min(c, math.ceil(fraction * c))
        top_scores, top = scores.masked_fill(~eligible, -1.0).topk(width, -1)  # [B, Hkv, n]
        chosen = (top_scores >= 0) & (torch.arange(width, device=q.device) < wanted[..., None])
        home = table.gather(1, (top // r).flatten(1)).view_as(top)  # [B, Hkv, n] CPU pages
        row = top % r
        head = heads[None, :, None].expand_as(top)
        centroids = self.centroids[layer, home, row, head].float()  # [B, Hkv, n, D]
        values = self.value_means[layer, home, row, head].float()
        sizes = self.sizes[layer, home, row, head]  # [B, Hkv, n]
        qg = q.float().view(b, hkv, hq // hkv, d)
        logits = torch.einsum("bhgd,bhnd->bhgn", qg, centroids) * scale
        logits = logits.masked_fill(~chosen[:, :, None], float("-inf"))
        m = logits.amax(-1)  # [B, Hkv, G]
        p = torch.exp(logits - torch.where(torch.isfinite(m), m, 0)[..., None]) * sizes[:, :, None]
        lsum = p.sum(-1)
        acc = torch.einsum("bhgn,bhnd->bhgd", p, values)
        return m.reshape(b, hq), lsum.reshape(b, hq), acc.reshape(b, hq, d)
