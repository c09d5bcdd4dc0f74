"""Each algorithm's selection against its formula written out plainly (fp32, random inputs,
tie-tolerant), and the runtime's windows: sink + top-k + local, budgets and mandatory pages."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import save_file

from spin_ray.sparse.algorithm_config import ALGORITHM_CONFIGS
from spin_ray.sparse.algorithms import SelectBatch, SparseGeometry, build_algorithm
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.selection import DecodeWindows, select_pages

PAGE, HKV, HQ, D, CPU_PAGES = 8, 2, 4, 16, 64
G = HQ // HKV
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)  # [D/2] Llama's RoPE


def _rotate(x: torch.Tensor, position: int) -> torch.Tensor:  # [..., D] -> [..., D]
    """RoPE (rotate-half pairs) at `position`, written out."""
    angle = position * INV_FREQ  # [D/2]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def _geometry(sink_tokens: int = 64) -> SparseGeometry:
    return SparseGeometry(
        num_layers=1,
        first_layer=0,
        num_cpu_pages=CPU_PAGES,
        page_size=PAGE,
        num_kv_heads=HKV,
        num_q_heads=HQ,
        head_dim=D,
        dtype=torch.float32,
        device=torch.device("cpu"),
        sink_tokens=sink_tokens,
        rope_inv_freq=INV_FREQ,
    )


def _indexed(name: str, num_pages: int, seed: int, sink_tokens: int = 64, **settings):
    """An algorithm that stored `num_pages` random pages of a sequence (keys with a spread of
    scales so scores differ): token by token as decode steps would, or for RetroInfer as one
    prefill chunk with no local window, then laid out (every page past the sink clustered);
    returns it, the stored keys/values [Hkv, n, S, D] (in the order the runtime would store
    them) and the page ids."""
    gen = torch.Generator().manual_seed(seed)
    config = SparseConfig(algorithm=ALGORITHM_CONFIGS[name](**settings), sink_tokens=sink_tokens)
    algorithm = build_algorithm(_geometry(sink_tokens), config)
    k = (
        torch.randn(HKV, num_pages, PAGE, D, generator=gen)
        * torch.rand(1, num_pages, 1, 1, generator=gen)
        * 3
    )
    v = torch.randn(HKV, num_pages, PAGE, D, generator=gen)
    page_ids = torch.randperm(CPU_PAGES, generator=gen)[:num_pages]
    if name != "retroinfer":
        _append(algorithm, page_ids, k, [1] * (num_pages * PAGE), v=v)
        return algorithm, k, v, page_ids
    _append(algorithm, page_ids, k, [num_pages * PAGE], chunks=True, v=v)
    order = _lay_out(algorithm, page_ids, k, v, -(-sink_tokens // PAGE), num_pages)

    def laid_out(x):  # [Hkv, n, S, D] -> the same, rows in `order`
        rows = x.permute(1, 2, 0, 3).reshape(-1, HKV, D)  # [T, Hkv, D]
        rows = rows.gather(0, order[..., None].expand_as(rows))
        return rows.view(num_pages, PAGE, HKV, D).permute(2, 0, 1, 3)

    return algorithm, laid_out(k), laid_out(v), page_ids


def _lay_out(algorithm, page_ids, k, v, first_page, end_page) -> torch.Tensor:  # [T, Hkv]
    """What the runtime does once a prompt is stored: every aligned span of `layout_tokens`
    cut to pages first_page..end_page-1 handed to `lay_out`; returns the order the sequence's
    tokens are then stored in."""
    keys = k.permute(1, 2, 0, 3).reshape(-1, HKV, D)  # [T, Hkv, D] in token order
    values = v.permute(1, 2, 0, 3).reshape(-1, HKV, D)
    order = torch.arange(keys.shape[0])[:, None].repeat(1, HKV)  # [T, Hkv]
    span = algorithm.layout_tokens // PAGE
    for j in range(first_page // span, -(-end_page // span)):
        a, e = max(j * span, first_page), min((j + 1) * span, end_page)
        if a < e:
            rows = slice(a * PAGE, e * PAGE)
            got = algorithm.lay_out(0, page_ids[a:e], a, keys[rows], values[rows])
            order[rows] = a * PAGE + got
    return order


def _append(algorithm, page_ids, k, runs, start=0, chunks=False, v=None):
    """Store the sequence's tokens start.. in runs of the given lengths (a run is one
    `append`, like a prefill chunk; a run of 1 is a decode token), each with a padding slot;
    with `chunks`, runs longer than one token go through `append_chunk` instead (no
    padding)."""
    tokens = torch.arange(k.shape[1] * PAGE)
    keys = k.permute(1, 2, 0, 3).reshape(-1, HKV, D)  # [T, Hkv, D] in token order
    v = torch.randn_like(k) if v is None else v
    values = v.permute(1, 2, 0, 3).reshape(-1, HKV, D)
    for n in runs:
        run = tokens[start : start + n]
        slots = page_ids[run // PAGE] * PAGE + run % PAGE
        if chunks and n > 1:
            algorithm.append_chunk(0, slots, keys[run], values[run], start, run)
        else:
            pad = torch.randn(1, HKV, D) * 100  # a padding row's key must not reach any page
            padded = (
                torch.cat([slots, torch.tensor([-1])]),
                torch.cat([keys[run], pad]),
                torch.cat([values[run], pad]),
            )
            algorithm.append(0, *padded, torch.cat([run, torch.tensor([0])]))
        start += n


def _batch(page_ids: torch.Tensor, indexed: int) -> SelectBatch:
    n = page_ids.numel()
    return SelectBatch(
        request_ids=("r",),
        page_table=page_ids[None].int(),
        num_pages=torch.tensor([n]),
        indexed_pages=torch.tensor([indexed]),
        context_lens=torch.tensor([n * PAGE]),
    )


def _budget(token_budget, sink=PAGE, local=2 * PAGE, attend_all=False) -> PageBudget:
    return PageBudget(
        page_size=PAGE,
        token_budget=token_budget,
        sink_tokens=sink,
        local_tokens=local,
        max_unindexed_tokens=PAGE + 4,
        attend_all=attend_all,
        retains=True,
        buffer_ratio=2.0,
        min_buffer_ratio=1.0,
    )


def _assert_top_pages(algorithm, q, page_ids, formula, budget):
    """The selected pages between sink and local window are a top-k of `formula` [Hkv, n]."""
    n = page_ids.numel()
    windows = DecodeWindows.build(budget, [n * PAGE], [n], torch.device("cpu"))
    pages = select_pages(algorithm.page_scores(0, q, _batch(page_ids, n)), windows)[0]
    sink, start = budget.sink_pages(n * PAGE), int(windows.local_start[0])
    k = int(windows.topk[0])
    assert 0 < k < start - sink, "the test needs a real choice"
    for h in range(HKV):
        chosen = {p for p in pages[h].tolist() if sink <= p < start}
        assert len(chosen) == k
        rest = set(range(sink, start)) - chosen
        worst_chosen = min(formula[h, p].item() for p in chosen)
        best_rest = max(formula[h, p].item() for p in rest)
        assert worst_chosen >= best_rest - 1e-5 * max(1.0, abs(best_rest))
        listed = [p for p in pages[h].tolist() if p >= 0]
        assert set(range(sink)) | set(range(start, n)) <= set(listed)
        assert len(listed) == len(set(listed)) == sink + k + (n - start)


@pytest.mark.parametrize("chunks", [False, True])
def test_quest_summaries_fold_in_any_order_of_runs(chunks):
    """Quest's min/max summaries after storing a sequence in prefill-like chunks that start and
    end mid-page (through `append`, or `append_chunk`'s whole-page reductions), then decode
    tokens, equal the elementwise min/max of each page's keys — also for pages that held
    another sequence's larger keys before."""
    algorithm, k, _, page_ids = _indexed("quest", 10, seed=3)
    other = torch.randn(HKV, 10, PAGE, D) * 50  # a new sequence reuses the same pages
    _append(algorithm, page_ids, other, [13, 30, 1, 1, PAGE * 10 - 45], chunks=chunks)
    runs = [PAGE * 6 + 3, PAGE * 3 + 2] + [1] * (PAGE - 5)
    _append(algorithm, page_ids, k, runs, chunks=chunks)
    kmin = algorithm.kmin[0, page_ids].permute(1, 0, 2)  # [Hkv, n, D]
    kmax = algorithm.kmax[0, page_ids].permute(1, 0, 2)
    torch.testing.assert_close(kmin, k.amin(2), atol=0, rtol=0)
    torch.testing.assert_close(kmax, k.amax(2), atol=0, rtol=0)


@pytest.mark.parametrize("chunks", [False, True])
def test_seer_summaries_fold_in_as_keys_are_stored(chunks):
    """Seer's page summaries are built as tokens are stored (prefill-like runs starting and
    ending mid-page, then decode tokens), from the keys before RoPE: each page's max, min and
    sum equal those of its un-rotated keys — also for pages another sequence held before."""
    algorithm, k, _, page_ids = _indexed("seer", 10, seed=3, block_size=2 * PAGE)
    other = torch.randn(HKV, 10, PAGE, D) * 50  # a new sequence reuses the same pages
    _append(algorithm, page_ids, other, [13, 30, 1, 1, PAGE * 10 - 45], chunks=chunks)
    _append(algorithm, page_ids, k, [PAGE * 6 + 3, PAGE * 3 + 2] + [1] * (PAGE - 5), chunks=chunks)
    before = torch.stack(
        [_before_rope(k[h].reshape(-1, D), 0).view(10, PAGE, D) for h in range(HKV)]
    )  # [Hkv, n, S, D]
    stats = {"kmax": before.amax(2), "kmin": before.amin(2), "ksum": before.sum(2)}
    for name, expected in stats.items():
        got = getattr(algorithm, name)[0, page_ids].permute(1, 0, 2)  # [Hkv, n, D]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_quest_score_is_the_formula_and_an_upper_bound_of_every_qk():
    algorithm, k, _, page_ids = _indexed("quest", 20, seed=0)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(10))
    scores = algorithm.page_scores(0, q, _batch(page_ids, 20))[0]  # [Hkv, n]
    formula = torch.zeros(HKV, 20)
    for h in range(HKV):
        for p in range(20):
            kmax, kmin = k[h, p].amax(0), k[h, p].amin(0)
            per_head = [
                sum(max(q[0, g, i] * kmax[i], q[0, g, i] * kmin[i]) for i in range(D))
                for g in range(h * G, (h + 1) * G)
            ]
            formula[h, p] = max(per_head)
            qk = q[0, h * G : (h + 1) * G] @ k[h, p].T  # [G, S] every q·k of the page
            assert scores[h, p] >= qk.max() - 1e-5
    torch.testing.assert_close(scores, formula)
    _assert_top_pages(algorithm, q, page_ids, formula, _budget(8 * PAGE))


def test_shadowkv_score_is_max_over_group_of_softmax_over_chunk_landmarks():
    algorithm, k, _, page_ids = _indexed("shadowkv", 20, seed=1, chunk_size=4)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(11))
    chunks = k.view(HKV, 20, 2, 4, D).mean(3)  # [Hkv, n, C, D] landmarks = chunk means
    formula = torch.zeros(HKV, 20)
    for h in range(HKV):
        per_head = []
        for g in range(h * G, (h + 1) * G):
            logits = (chunks[h].reshape(-1, D) @ q[0, g]) / math.sqrt(D)
            per_head.append(torch.softmax(logits, 0).view(20, 2))
        formula[h] = torch.stack(per_head).amax(0).amax(-1)  # max over heads, chunks of page
    scores = algorithm.page_scores(0, q, _batch(page_ids, 20))[0]
    torch.testing.assert_close(scores, formula)
    _assert_top_pages(algorithm, q, page_ids, formula, _budget(8 * PAGE))


def test_shadowkv_landmarks_fold_in_as_keys_are_stored():
    """ShadowKV's landmarks are built as tokens are stored: prefill-like chunks that start and
    end mid-chunk (`append_chunk`), then decode tokens one by one (`append`: running means) —
    also over pages another sequence held before — equal each chunk's mean key."""
    algorithm, k, _, page_ids = _indexed("shadowkv", 10, seed=5, chunk_size=4)
    other = torch.randn(HKV, 10, PAGE, D) * 50  # a new sequence reuses the same pages
    _append(algorithm, page_ids, other, [13, 30, 1, 1, PAGE * 10 - 45], chunks=True)
    runs = [PAGE * 6 + 3, 2, PAGE * 3] + [1] * (PAGE - 5)
    _append(algorithm, page_ids, k, runs, chunks=True)
    got = algorithm.landmarks[0, page_ids].permute(1, 0, 2, 3)  # [Hkv, n, C, D]
    torch.testing.assert_close(got, k.view(HKV, 10, 2, 4, D).mean(3), atol=1e-5, rtol=1e-5)


def _before_rope(keys: torch.Tensor, first_token: int) -> torch.Tensor:  # [T, D] -> [T, D]
    """Stored keys (after RoPE at first_token, first_token + 1, ...) as they were before."""
    return torch.stack([_rotate(key, -(first_token + t)) for t, key in enumerate(keys)])


def test_seer_default_gate_scores_the_block_mean_key_as_the_query_sees_it():
    """W_q = I, W_k = [0; 0; I]: R_p(mean query before RoPE) · R_end(mean key before RoPE)."""
    algorithm, k, _, page_ids = _indexed("seer", 24, seed=2, block_size=2 * PAGE)
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(12))
    at = 24 * PAGE - 1  # the query's position
    formula = torch.zeros(HKV, 24)
    for h in range(HKV):
        q_mean = torch.stack([_rotate(x, -at) for x in q[0, h * G : (h + 1) * G]]).mean(0)
        for block in range(12):
            keys = _before_rope(k[h, 2 * block : 2 * block + 2].reshape(-1, D), block * 2 * PAGE)
            end = (block + 1) * 2 * PAGE - 1
            score = _rotate(q_mean, at) @ _rotate(keys.mean(0), end) / math.sqrt(D)
            formula[h, 2 * block : 2 * block + 2] = score
    scores = algorithm.page_scores(0, q, _batch(page_ids, 24))[0]
    torch.testing.assert_close(scores, formula, rtol=1e-4, atol=1e-4)
    _assert_top_pages(algorithm, q, page_ids, formula, _budget(9 * PAGE))


def test_seer_gate_file_weights_are_used(tmp_path):
    gen = torch.Generator().manual_seed(3)
    q_gate, k_gate = (
        torch.randn(HKV, D, D, generator=gen),
        torch.randn(HKV, 3 * D, D, generator=gen),
    )
    path = tmp_path / "gate.safetensors"
    save_file({"layers.0.q_gate": q_gate, "layers.0.k_gate": k_gate}, str(path))
    algorithm, k, _, page_ids = _indexed(
        "seer", 16, seed=4, block_size=2 * PAGE, gate_path=str(path)
    )
    q = torch.randn(1, HQ, D, generator=gen)
    at = 16 * PAGE - 1
    formula = torch.zeros(HKV, 16)
    for h in range(HKV):
        q_mean = torch.stack([_rotate(x, -at) for x in q[0, h * G : (h + 1) * G]]).mean(0)
        q_gated = _rotate(q_mean @ q_gate[h], at)
        for block in range(8):
            keys = _before_rope(k[h, 2 * block : 2 * block + 2].reshape(-1, D), block * 2 * PAGE)
            pooled = torch.cat([keys.amax(0), keys.amin(0), keys.mean(0)])
            k_gated = _rotate(pooled @ k_gate[h], (block + 1) * 2 * PAGE - 1)
            formula[h, 2 * block : 2 * block + 2] = q_gated @ k_gated / math.sqrt(D)
    # the same formula summed in another order: fp32 rounding of sums of 3·D products, so the
    # tolerance scales with the scores' magnitude (a wrong gate or pooling is off by O(scale))
    scale = formula.abs().max().item()
    torch.testing.assert_close(
        algorithm.page_scores(0, q, _batch(page_ids, 16))[0],
        formula,
        rtol=1e-5,
        atol=1e-5 * scale,
    )
    with pytest.raises(ValueError, match="gate_path"):
        _indexed("seer", 4, seed=5, block_size=2 * PAGE, gate_path=str(tmp_path / "no"))


def _retro_clusters(algorithm, page_ids: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per KV head, the request's clusters (id, first token row, size) in id order, from the
    cluster sizes alone: the runtime stores each cluster's tokens consecutively, clusters in
    id order (cluster id = home logical page · rows_per_page + row)."""
    r = algorithm.rows_per_page
    sizes = algorithm.sizes[0, page_ids.long()]  # [n, R, Hkv]
    heads = []
    for h in range(HKV):
        row, clusters = 0, []
        for c in range(page_ids.numel() * r):
            size = int(sizes[c // r, c % r, h])
            if size:
                clusters.append((c, row, size))
                row += size
        assert row == page_ids.numel() * PAGE, "the clusters must cover every token once"
        heads.append(clusters)
    return heads


def test_kmeans_is_lloyds_algorithm():
    """`kmeans` against Lloyd's iterations written out (nearest centroid by distance, then
    each non-empty cluster's mean), from evenly spaced initial points."""
    from spin_ray.sparse.algorithms.retroinfer import kmeans

    x = torch.randn(2, 40, 5, generator=torch.Generator().manual_seed(2))

    def nearest(point, centroids):
        return min(range(6), key=lambda c: float((point - centroids[c]).norm()))

    for h in range(2):
        centroids = [x[h, round(i * 39 / 5)] for i in range(6)]
        for _ in range(3):
            assign = [nearest(point, centroids) for point in x[h]]
            for c in range(6):
                members = [x[h, i] for i in range(40) if assign[i] == c]
                if members:
                    centroids[c] = torch.stack(members).mean(0)
        assert kmeans(x, 6, 3)[h].tolist() == [nearest(point, centroids) for point in x[h]]


def test_retroinfer_lays_segments_out_by_cluster_with_exact_summaries():
    """Two prefill chunks split mid-page make every page one cluster of its own tokens; then
    the segments (8 pages, cut to pages 2..20 as the runtime cuts them to the sink's pages
    and the local window) are k-means clustered and laid out by cluster, tokens moving only
    within their segment, and the other pages keep their tokens. Every cluster's summaries are
    its tokens' mean key, mean value and count, and each page's range names the clusters of
    its tokens."""
    from spin_ray.sparse.algorithms.retroinfer import kmeans

    n = 24
    config = SparseConfig(
        algorithm=ALGORITHM_CONFIGS["retroinfer"](
            segment_tokens=8 * PAGE, cluster_tokens=8, kmeans_iters=3
        ),
        sink_tokens=2 * PAGE - 1,
    )
    algorithm = build_algorithm(_geometry(2 * PAGE - 1), config)
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(HKV, n, PAGE, D, generator=gen) * torch.rand(1, n, 1, 1, generator=gen) * 3
    v = torch.randn(HKV, n, PAGE, D, generator=gen)
    page_ids = torch.randperm(CPU_PAGES, generator=gen)[:n]
    _append(algorithm, page_ids, k, [10 * PAGE + 3, 14 * PAGE - 3], chunks=True, v=v)
    r = algorithm.rows_per_page
    for h, clusters in enumerate(_retro_clusters(algorithm, page_ids)):  # one per page
        assert [c for c, _, _ in clusters] == [p * r for p in range(n)]
        for p in range(n):
            centroid = algorithm.centroids[0, page_ids[p], 0, h]
            torch.testing.assert_close(centroid, k[h, p].mean(0))
    order = _lay_out(algorithm, page_ids, k, v, 2, 21)  # [T, Hkv] the stored order
    keys = k.permute(1, 2, 0, 3).reshape(-1, HKV, D)  # [T, Hkv, D] in position order
    values = v.permute(1, 2, 0, 3).reshape(-1, HKV, D)
    segments = [(2, 8), (8, 16), (16, 21)]
    in_place = [0, 1, 21, 22, 23]
    for h in range(HKV):
        for p in in_place:
            rows = torch.arange(p * PAGE, (p + 1) * PAGE)
            assert order[rows, h].tolist() == rows.tolist()
        for a, b in segments:
            rows = slice(a * PAGE, b * PAGE)
            assign = kmeans(keys[rows, h][None], (b - a) * PAGE // 8, 3)[0]
            expected = a * PAGE + torch.sort(assign, stable=True).indices
            assert order[rows, h].tolist() == expected.tolist()
    stored_k = keys.gather(0, order[..., None].expand_as(keys))  # [T, Hkv, D] as stored
    stored_v = values.gather(0, order[..., None].expand_as(values))
    for h, clusters in enumerate(_retro_clusters(algorithm, page_ids)):
        cluster_of = torch.empty(n * PAGE, dtype=torch.long)
        for c, first, size in clusters:
            home, rows = page_ids[c // r], slice(first, first + size)
            cluster_of[rows] = c
            centroid = algorithm.centroids[0, home, c % r, h]
            torch.testing.assert_close(centroid, stored_k[rows, h].mean(0))
            value_mean = algorithm.value_means[0, home, c % r, h]
            torch.testing.assert_close(value_mean, stored_v[rows, h].mean(0))
        for p in range(n):
            ids = cluster_of[p * PAGE : (p + 1) * PAGE]
            assert algorithm.ranges[0, page_ids[p], h].tolist() == [ids.min(), ids.max()]
            if p in in_place:
                assert ids.tolist() == [p * r] * PAGE


def test_retroinfer_scores_and_estimation_zone_follow_the_formula():
    algorithm, k, v, page_ids = _indexed(
        "retroinfer",
        24,
        seed=7,
        segment_tokens=8 * PAGE,
        cluster_tokens=4,
        estimation_fraction=0.25,
        sink_tokens=PAGE,
    )
    r = algorithm.rows_per_page
    q = torch.randn(1, HQ, D, generator=torch.Generator().manual_seed(13))
    heads = _retro_clusters(algorithm, page_ids)
    cluster_score = [{} for _ in range(HKV)]
    formula = torch.zeros(HKV, 24)
    for h, clusters in enumerate(heads):
        centroid = {c: algorithm.centroids[0, page_ids[c // r], c % r, h] for c, _, _ in clusters}
        for g in range(h * G, (h + 1) * G):
            logits = torch.stack([centroid[c] @ q[0, g] / math.sqrt(D) for c, _, _ in clusters])
            for (c, _, _), p in zip(clusters, torch.softmax(logits, 0), strict=True):
                cluster_score[h][c] = cluster_score[h].get(c, 0.0) + p
        for c, first, size in clusters:  # a page scores as its best cluster
            for t in range(first, first + size):
                formula[h, t // PAGE] = max(formula[h, t // PAGE], cluster_score[h][c])
    batch = _batch(page_ids, 24)
    torch.testing.assert_close(algorithm.page_scores(0, q, batch)[0], formula)
    budget = _budget(8 * PAGE)
    _assert_top_pages(algorithm, q, page_ids, formula, budget)

    windows = DecodeWindows.build(budget, [24 * PAGE], [24], torch.device("cpu"))
    pages = select_pages(algorithm.page_scores(0, q, batch), windows)
    m, lsum, acc = algorithm.estimate(0, q, batch, pages, scale=0.3)
    for h, clusters in enumerate(heads):
        exact = {p for p in pages[0, h].tolist() if p >= 0}
        eligible = [
            (c, first, size) for c, first, size in clusters
            if not any((first + i) // PAGE in exact for i in range(size))
        ]  # fmt: skip
        eligible.sort(key=lambda cluster: -float(cluster_score[h][cluster[0]]))
        zone = eligible[: int(0.25 * len(clusters))]
        assert zone, "the test needs an estimation zone"
        keys, values = k[h].reshape(-1, D), v[h].reshape(-1, D)  # as stored
        for g in range(h * G, (h + 1) * G):
            logits = torch.stack([keys[f : f + s].mean(0) @ q[0, g] * 0.3 for _, f, s in zone])
            sizes = torch.tensor([float(s) for _, _, s in zone])
            sums = torch.stack([values[f : f + s].sum(0) for _, f, s in zone])
            # (m, l, acc) stand for Σ size·e^logit and Σ e^logit·value_sum (kept as mean value
            # and size: fp32 rounding of the product)
            torch.testing.assert_close(lsum[0, g] * m[0, g].exp(), (sizes * logits.exp()).sum())
            torch.testing.assert_close(
                acc[0, g] * m[0, g].exp(), logits.exp() @ sums, rtol=1e-5, atol=1e-5
            )


def test_dense_selects_every_page():
    algorithm, _, _, page_ids = _indexed("full", 12, seed=8)
    budget = _budget(PAGE, attend_all=True)
    windows = DecodeWindows.build(budget, [12 * PAGE - 3], [11], torch.device("cpu"))
    q = torch.randn(1, HQ, D)
    pages = select_pages(algorithm.page_scores(0, q, _batch(page_ids, 11)), windows)[0]
    for h in range(HKV):
        assert sorted(p for p in pages[h].tolist() if p >= 0) == list(range(12))


@pytest.mark.parametrize("token_budget", [5 * PAGE, 0.3, 1.0])
def test_windows_respect_budget_and_mandatory_bound(token_budget):
    """For every context and index state the runtime may meet, the attended pages fit the
    budget (beyond sink + local), never exceed `mandatory_pages`, and the HBM floor and
    target are never below mandatory."""
    sink_tokens, local_tokens = PAGE + 3, 2 * PAGE + 1
    budget = _budget(token_budget, sink=sink_tokens, local=local_tokens)
    for context in range(1, 40 * PAGE):
        pages = math.ceil(context / PAGE)
        complete = (context - 1) // PAGE
        for indexed in {complete, max(0, complete - 1), max(0, complete - 2)}:
            windows = DecodeWindows.build(budget, [context], [indexed], torch.device("cpu"))
            scores = torch.randn(1, HKV, pages)
            listed = select_pages(scores, windows)[0]
            count = int((listed[0] >= 0).sum())
            # the windows, written out: sink pages, the always-attended tail from the local
            # window (or the first page the index does not cover), top-k in between
            sink = min(pages, math.ceil(sink_tokens / PAGE))
            start = max(sink, min(indexed, max(0, context - local_tokens) // PAGE))
            budget_tokens = (
                math.ceil(token_budget * context) if isinstance(token_budget, float)
                else token_budget
            )  # fmt: skip
            k = max(0, math.ceil(budget_tokens / PAGE) - sink - math.ceil(local_tokens / PAGE))
            k = min(k, start - sink)
            assert (int(windows.local_start[0]), int(windows.topk[0])) == (start, k)
            assert count == sink + k + (pages - start)
            assert count <= budget.mandatory_pages(context)
            assert budget.mandatory_pages(context) <= budget.floor_pages(context)
            assert budget.floor_pages(context) <= budget.target_pages(context)
            if isinstance(token_budget, float):
                allowed = math.ceil(token_budget * context / PAGE)
            else:
                allowed = token_budget // PAGE
            assert int(windows.topk[0]) <= max(0, allowed)
            if token_budget == 1.0:
                assert count == pages, "a budget covering the context attends every page"


def test_buffer_target_is_capped_at_what_fused_retrieval_holds():
    """The target is mandatory × (1 + buffer_ratio) up to the context, at most
    `max_target_pages` unless the floor is higher; engines cap it at the fused retrieval
    kernel's candidate limit, so a request's slot list never falls back to the torch path for
    its buffer alone."""
    from spin_ray.kernels.spin_retrieve import fits
    from spin_ray.sparse.budget import MAX_TARGET_PAGES

    assert fits(1, MAX_TARGET_PAGES) and not fits(1, MAX_TARGET_PAGES + 1)
    built = PageBudget.from_config(SparseConfig(), PAGE, 1)
    assert built.max_target_pages == MAX_TARGET_PAGES
    capped = dataclasses.replace(_budget(6 * PAGE, sink=PAGE, local=PAGE), max_target_pages=20)
    for context in range(1, 60 * PAGE, 7):
        mandatory = capped.mandatory_pages(context)
        floor = capped.floor_pages(context)
        uncapped = min(capped.num_pages(context), math.ceil(mandatory * 3))  # buffer_ratio 2
        assert capped.target_pages(context) == min(uncapped, max(20, floor))


@pytest.mark.parametrize("share", [0.5, 0.3, 1.0])
def test_prefetch_selects_the_best_scored_share_of_the_topk(share):
    """A lookahead's selection (`prefetch_topk`, `SparseConfig.lookahead_share`): the sink, the
    ceil(share × k) best-scored pages of the selectable range, the local tail — for rows of
    different contexts in one step, against torch.topk written out."""
    budget = _budget(10 * PAGE, sink=PAGE, local=2 * PAGE)
    contexts = [40 * PAGE, 23 * PAGE + 5, 9 * PAGE]
    indexed = [(t - 1) // PAGE for t in contexts]
    windows = DecodeWindows.build(
        budget, contexts, indexed, torch.device("cpu"), prefetch_share=share
    )
    scores = torch.randn(len(contexts), HKV, int(windows.num_pages.max()))
    listed = select_pages(scores, windows, windows.prefetch_topk)
    full = select_pages(scores, windows)
    for b in range(len(contexts)):
        sink, start = 1, int(windows.local_start[b])
        k = int(windows.topk[b])
        assert int(windows.prefetch_topk[b]) == math.ceil(round(k * share, 9))
        for h in range(HKV):
            row = listed[b, h][listed[b, h] >= 0].tolist()
            best = scores[b, h, sink:start].topk(math.ceil(round(k * share, 9))).indices + sink
            local = list(range(start, int(windows.num_pages[b])))
            assert row[:sink] == [0] and row[len(row) - len(local) :] == local
            assert sorted(row[sink : len(row) - len(local)]) == sorted(best.tolist())
            assert set(row) <= set(full[b, h].tolist())  # a subset of the real selection
