"""SpinAttentionBackend against plain attention, layer by layer, on random q/k/v: with a budget
covering the context it equals the dense backend; with a small budget each decode token's
output is exact softmax attention over the tokens of the pages it selected — whatever was
evicted, fetched or left resident in between."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from small_algorithms import small_algorithm

import spin_ray.sparse.retrieve as retrieve_module
import spin_ray.sparse.selection as selection_module
from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.cache.config import CacheConfig
from spin_ray.cache.kv_cache import KVCache, KVCacheShape
from spin_ray.engine.tiered_kv_cache import build_tiered_cache
from spin_ray.models.arch import ModelArch
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.manager import TieredCacheManager
from spin_ray.sparse.presets import preset

PAGE, LAYERS, HQ, HKV, D = 4, 3, 4, 2, 8
ARCH = ModelArch(
    model_type="llama",
    hidden_size=HQ * D,
    num_layers=LAYERS,
    num_heads=HQ,
    num_kv_heads=HKV,
    head_dim=D,
    intermediate_size=64,
    vocab_size=100,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    rope_scaling=None,
    max_position_embeddings=4096,
)


def _meta(manager, chunks):
    """AttentionMetadata of one step: chunks = [(request id, first token, new tokens)]."""
    tables = [manager.table(rid) for rid, _, _ in chunks]
    width = max(len(t) for t in tables)
    starts, slots = [0], []
    for (_rid, first, n), table in zip(chunks, tables):
        starts.append(starts[-1] + n)
        slots += [table[p // PAGE] * PAGE + p % PAGE for p in range(first, first + n)]
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor([f + n for _, f, n in chunks], dtype=torch.int32),
        page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_lens_cpu=tuple(n for _, _, n in chunks),
        context_lens_cpu=tuple(f + n for _, f, n in chunks),
        page_size=PAGE,
        request_ids=tuple(rid for rid, _, _ in chunks),
        positions=torch.tensor([p for _, f, n in chunks for p in range(f, f + n)]),
    )


def _steps(prompts: dict[str, int], decodes: int, chunk: int):
    """Chunked prefills (one request's chunk per step, decodes of the others alongside), then
    `decodes` decode steps of everyone."""
    done = {rid: 0 for rid in prompts}
    steps = []
    for rid, n in prompts.items():
        while done[rid] < n:
            take = min(chunk, n - done[rid])
            others = [(r, done[r], 1) for r in prompts if r != rid and done[r] >= prompts[r]]
            steps.append([(rid, done[rid], take), *others])
            done[rid] += take
            for r, _, _ in others:
                done[r] += 1
    for _ in range(decodes):
        steps.append([(r, done[r], 1) for r in prompts])
        for r in prompts:
            done[r] += 1
    return steps


def _run(
    sparse: SparseConfig, prompts, decodes, check, seed=0, holder=None, fused=False, slot_width=1
):
    """`slot_width`: the least width of the slot lists (what `presize` fixes for graphs)."""
    sizes = dataclasses.replace(
        sparse,
        cpu_cache_tokens=256 * PAGE,
        gpu_cache_tokens=200 * PAGE,
        fused_retrieve=fused,
        check_invariants=True,
    )
    tiered = build_tiered_cache(
        sizes, CacheConfig(page_size=PAGE), ARCH, "cpu", torch.float32, reserve_bytes=0
    )
    manager, spin = tiered.page_tables, tiered.backend
    manager.slot_width = slot_width
    if holder is not None:
        holder["backend"] = spin
    shape = KVCacheShape(LAYERS, manager.pool.num_pages, PAGE, HKV, D)
    dense = DenseAttentionBackend(KVCache(shape, torch.float32, "cpu"))
    gen = torch.Generator().manual_seed(seed)
    for chunks in _steps(prompts, decodes, chunk=23):
        for rid, first, n in chunks:  # a prompt is covered whole at admission, as the
            need = max(first + n, prompts[rid])  # scheduler does
            assert manager.can_grow(rid, need)
            manager.grow(rid, need)
        meta = _meta(manager, chunks)
        spin.plan(meta)
        dense.plan(meta)
        tokens = sum(n for _, _, n in chunks)
        for layer in range(LAYERS):
            q = torch.randn(tokens, HQ, D, generator=gen)
            k = torch.randn(tokens, HKV, D, generator=gen) * 2
            v = torch.randn(tokens, HKV, D, generator=gen)
            expected = dense.forward(layer, q, k, v, 1 / math.sqrt(D))
            out = spin.forward(layer, q, k, v, 1 / math.sqrt(D))
            check(layer, meta, q, out, expected, dense)
        manager.check_integrity()
    return tiered.stats()


PROMPTS = {"a": 61, "b": 45, "c": 30}


@pytest.mark.parametrize("mode", ["spin", "sparse-naive", "dense-offload"])
@pytest.mark.parametrize("algorithm", ["quest", "full"])
def test_full_budget_equals_dense_attention_every_layer(mode, algorithm):
    def check(layer, meta, q, out, expected, dense):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    sparse = preset(mode, SparseConfig(algorithm=algorithm, token_budget=1.0, dense_layers=1))
    stats = _run(sparse, PROMPTS, decodes=12, check=check)
    assert stats.lookups > 0


@pytest.mark.parametrize(
    "algorithm,mode",
    [("quest", "spin"), ("quest", "sparse-naive"), ("shadowkv", "spin"), ("seer", "spin"),
     ("retroinfer", "spin")],
)  # fmt: skip
def test_small_budget_attends_exactly_the_selected_pages(monkeypatch, algorithm, mode):
    """Each decode token's output = softmax attention over the tokens of the pages selected
    for its KV head (read from the dense cache, the ground truth), under real evictions."""
    selected = {}
    real_select = selection_module.select_pages

    def recording_select(scores, windows, topk=None):
        selected["pages"] = real_select(scores, windows, topk)
        return selected["pages"]

    monkeypatch.setattr(selection_module, "select_pages", recording_select)
    holder = {}

    def check(layer, meta, q, out, expected, dense):
        starts = meta.query_start_loc.tolist()
        decodes = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
        for b, n in enumerate(meta.query_lens_cpu):  # dense paths: layer 0 and prefill chunks
            if layer == 0 or n > 1:
                rows = slice(starts[b], starts[b + 1])
                torch.testing.assert_close(out[rows], expected[rows], atol=1e-5, rtol=1e-5)
        if layer == 0 or not decodes:
            return
        pages = selected["pages"]  # [B_decode, Hkv, K] logical pages, decode sequences in order
        truth_k, truth_v = dense.kv_cache.k[layer], dense.kv_cache.v[layer]  # [P, S, Hkv, D]
        k_cache, v_cache = truth_k, truth_v
        if algorithm == "retroinfer":  # its pages hold tokens in cluster order: read the tier
            host = holder["backend"].host  # (checked below against the dense cache)
            k_cache, v_cache = host.k[layer - 1].transpose(1, 2), host.v[layer - 1].transpose(1, 2)
        for i, b in enumerate(decodes):
            ctx, row = meta.context_lens_cpu[b], starts[b]
            if algorithm == "retroinfer":  # the tier holds the context's K/V, reordered
                every = torch.arange(ctx)
                ids = meta.page_table[b, every // PAGE].long()
                for cache, truth in ((k_cache, truth_k), (v_cache, truth_v)):
                    held = cache[ids, every % PAGE].transpose(0, 1)  # [Hkv, ctx, D]
                    real = truth[ids, every % PAGE].transpose(0, 1)
                    same = (held[:, :, None] == real[:, None]).all(-1)  # [Hkv, ctx, ctx]
                    order = same.float().argmax(-1)  # [Hkv, ctx] the true token of each row
                    assert same.any(-1).all(), "a tier row that is no token of the context"
                    assert all(len(set(o.tolist())) == ctx for o in order), "not a permutation"
            for h in range(HKV):
                listed = [p for p in pages[i, h].tolist() if p >= 0]
                if ctx > 12 * PAGE:
                    assert len(listed) < -(-ctx // PAGE), "the budget must leave pages out"
                tokens = torch.tensor(
                    [t for p in listed for t in range(p * PAGE, min(ctx, (p + 1) * PAGE))]
                )
                ids = meta.page_table[b, tokens // PAGE].long()
                keys = k_cache[ids, tokens % PAGE, h]  # [T, D]
                values = v_cache[ids, tokens % PAGE, h]
                for g in range(h * HQ // HKV, (h + 1) * HQ // HKV):
                    weights = torch.softmax(keys @ q[row, g] / math.sqrt(D), 0)
                    torch.testing.assert_close(out[row, g], weights @ values, atol=1e-5, rtol=1e-5)

    # RetroInfer's estimation zone adds approximate terms (its formula is tested on its own)
    fields = dict(estimation_fraction=0.0) if algorithm == "retroinfer" else {}
    sparse = SparseConfig(
        algorithm=small_algorithm(algorithm, PAGE, **fields),
        tiers=mode,
        token_budget=5 * PAGE,
        sink_tokens=PAGE,
        local_tokens=PAGE,
        dense_layers=1,
        buffer_ratio=1.0,
    )
    stats = _run(sparse, PROMPTS, decodes=14, check=check, seed=1, holder=holder)
    assert stats.h2d_bytes > 0
    if mode == "spin":
        assert 0 < stats.hits < stats.lookups and stats.evictions > 0
    else:
        assert stats.hits == 0


@pytest.mark.parametrize("budget_pages, buffer_ratio", [(5, 1.0), (9, 0.5)])
def test_fused_retrieval_kernels_match_the_torch_path(monkeypatch, budget_pages, buffer_ratio):
    """The same steps retrieved by the fused Triton kernels (interpreter) and by the torch path
    they replace: after every layer the same outputs, slot contents and recency, the same page
    found in the same slot for every (request, layer, head, page), the same number of free
    segments and the same counters — under evictions with a small buffer."""
    sparse = SparseConfig(
        algorithm="quest", token_budget=budget_pages * PAGE, sink_tokens=PAGE, local_tokens=PAGE,
        dense_layers=1, buffer_ratio=buffer_ratio,
    )  # fmt: skip
    _assert_fused_matches_torch(monkeypatch, sparse, PROMPTS, decodes=8, seed=2)


def test_fused_retrieval_on_wide_slot_lists_matches_the_torch_path(monkeypatch):
    """Slot lists padded to a fixed width of 256 (as `presize` fixes them for CUDA graphs),
    with rows of 8, 23 and 68 slots: the kernel picks a 16-, 64- and 256-wide block per row
    at run time, and every row retrieves as the torch path does (evictions in the widest)."""
    sparse = SparseConfig(
        algorithm="quest", token_budget=20 * PAGE, sink_tokens=PAGE, local_tokens=PAGE,
        dense_layers=1, buffer_ratio=2.2,
    )  # fmt: skip
    prompts = {"a": 600, "b": 90, "c": 30}
    holder = _assert_fused_matches_torch(
        monkeypatch, sparse, prompts, decodes=8, seed=3, slot_width=256
    )
    manager = holder["backend"].manager
    held = sorted(len(s) for s in manager.slots.values())
    assert held[0] <= 16 < held[1] <= 64 < held[2] < len(manager.table("a"))  # one row per
    # block; a's buffer holds fewer slots than it has pages


def _assert_fused_matches_torch(monkeypatch, sparse, prompts, decodes, seed, slot_width=1):
    """Run the steps with the torch path, then with the fused kernels; compare after every
    layer. Returns the fused run's holder (its backend)."""
    launches = []
    real = retrieve_module.spin_retrieve
    monkeypatch.setattr(retrieve_module, "spin_retrieve", lambda *a: launches.append(1) or real(*a))
    traces = []
    for fused in (False, True):
        holder, trace = {}, []

        def check(layer, meta, q, out, expected, dense, trace=trace, holder=holder):
            spin = holder["backend"]
            residency = spin.residency
            rows = sorted(spin.manager.rows.values())
            pages = torch.arange(residency.dir_len * residency.segment_pages)
            query = pages.expand(len(rows), HKV, -1)
            found = [residency.lookup(torch.tensor(rows), lt, query) for lt in range(LAYERS - 1)]
            counts = spin.counters.device_counts.tolist()
            trace.append((out.clone(), residency.slot_page.clone(), residency.slot_bucket.clone(),
                          found, int(residency.free_top), counts))  # fmt: skip

        stats = _run(sparse, prompts, decodes=decodes, check=check, seed=seed, holder=holder,
                     fused=fused, slot_width=slot_width)  # fmt: skip
        traces.append(trace)
    assert stats.evictions > 0 and 0 < stats.hits < stats.lookups
    assert len(launches) >= decodes * (LAYERS - 1), "the fused kernels ran on every decode layer"
    for ref, got in zip(*traces, strict=True):
        torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
        assert all(torch.equal(a, b) for a, b in zip(got[3], ref[3]))
        assert got[4:] == ref[4:]
    return holder


@pytest.mark.parametrize("mode", ["spin", "sparse-naive"])
def test_invariant_checks_catch_a_request_below_its_mandatory_slots(monkeypatch, mode):
    """The manager never leaves a request fewer slots than its mandatory pages, so the decode
    path does not check it (a check would synchronise); `check_invariants` does: give every request
    only 2 slots and the first decode layer must refuse."""
    real = TieredCacheManager.slot_lists
    monkeypatch.setattr(
        TieredCacheManager, "slot_lists", lambda self, *args: real(self, *args)[:, :2]
    )
    sparse = SparseConfig(algorithm="quest", tiers=mode, token_budget=5 * PAGE, sink_tokens=PAGE,
                          local_tokens=PAGE, dense_layers=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="fewer GPU slots than its mandatory pages"):
        _run(sparse, PROMPTS, decodes=2, check=lambda *args: None)


@pytest.mark.parametrize("algorithm", ["quest", "shadowkv", "seer", "retroinfer", "full"])
def test_sink_and_local_tokens_are_attended_every_step(monkeypatch, algorithm):
    """On every decode step, layer and KV head, the pages attended hold (by position) the first
    `sink_tokens` and the last `local_tokens` tokens of the context: each tier row of a listed
    page is matched to the true token it holds in the dense cache (RetroInfer reorders rows
    within pages it clusters, so page numbers alone would not say)."""
    selected = {}
    real_select = selection_module.select_pages

    def recording_select(scores, windows, topk=None):
        selected["pages"] = real_select(scores, windows, topk)
        return selected["pages"]

    monkeypatch.setattr(selection_module, "select_pages", recording_select)
    holder, checked = {}, []
    sink, local = 2 * PAGE, 3 * PAGE

    def check(layer, meta, q, out, expected, dense):
        decodes = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
        if layer == 0 or not decodes:
            return
        host = holder["backend"].host
        held_v = host.v[layer - 1].transpose(1, 2)  # [P, S, Hkv, D] as the tier holds them
        truth_v = dense.kv_cache.v[layer]  # [P, S, Hkv, D] in position order
        for i, b in enumerate(decodes):
            ctx = meta.context_lens_cpu[b]
            every = torch.arange(ctx)
            ids = meta.page_table[b, every // PAGE].long()
            for h in range(HKV):
                listed = [p for p in selected["pages"][i, h].tolist() if p >= 0]
                rows = torch.tensor([t for p in listed for t in range(p * PAGE, (p + 1) * PAGE)
                                     if t < ctx])  # fmt: skip
                held = held_v[meta.page_table[b, rows // PAGE].long(), rows % PAGE, h]  # [R, D]
                truth = truth_v[ids, every % PAGE, h]  # [ctx, D]
                same = (held[:, None] == truth[None]).all(-1)  # [R, ctx]
                assert same.any(-1).all(), "a tier row that is no token of the context"
                positions = set(same.float().argmax(-1).tolist())
                must = set(range(min(sink, ctx))) | set(range(max(0, ctx - local), ctx))
                assert must <= positions, f"step at {ctx}: missing {sorted(must - positions)}"
                checked.append(ctx)

    sparse = SparseConfig(
        algorithm=small_algorithm(algorithm, PAGE), token_budget=8 * PAGE, sink_tokens=sink,
        local_tokens=local, dense_layers=1, buffer_ratio=1.0,
    )  # fmt: skip
    _run(sparse, PROMPTS, decodes=14, check=lambda *a: check(*a), seed=4, holder=holder)
    assert max(checked) > 12 * PAGE  # contexts long enough that the budget leaves pages out


@pytest.mark.parametrize("mode", ["spin", "sparse-naive"])
def test_retroinfer_lays_out_whole_segments_across_prefill_chunks(mode):
    """RetroInfer's segments (8 pages) span several 23-token prefill chunks: each is laid out
    whole, once the chunk that completes it is stored (its beginning read back from the HBM
    prefill slots under spin, from the CPU tier under sparse-naive, and rewritten there), so
    the CPU tier holds each segment — cut to the sink's page and the prompt's local window —
    in the order of k-means over the segment's true keys, whatever the chunking."""
    from spin_ray.sparse.algorithms.retroinfer import kmeans

    holder, checked = {}, []
    config = small_algorithm("retroinfer", PAGE)  # 32-token segments, 4-token clusters

    def check(layer, meta, q, out, expected, dense):
        decodes = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
        if layer == 0 or not decodes:
            return
        host = holder["backend"].host
        for b in decodes:
            rid = meta.request_ids[b]
            if (rid, layer) in checked:
                continue
            prompt = PROMPTS[rid]
            local = (prompt - PAGE) // PAGE * PAGE  # the prompt's local window, whole pages
            for a in range(0, local, config.segment_tokens):
                a, e = max(a, PAGE), min(a + config.segment_tokens, local)
                rows = torch.arange(a, e)
                ids = meta.page_table[b, rows // PAGE].long()
                for h in range(HKV):
                    held = host.k[layer - 1, ids, h, rows % PAGE]  # [m, D] as the tier holds
                    truth = dense.kv_cache.k[layer][ids, rows % PAGE, h]  # [m, D] by position
                    same = (held[:, None] == truth[None]).all(-1)  # [m, m]
                    assert (same.sum(-1) == 1).all(), "the tier must hold the span's tokens"
                    stored = a + same.float().argmax(-1)
                    assign = kmeans(truth[None], (e - a) // config.cluster_tokens,
                                    config.kmeans_iters)[0]  # fmt: skip
                    assert stored.tolist() == (a + torch.sort(assign, stable=True).indices).tolist()
            checked.append((rid, layer))

    sparse = preset(mode, SparseConfig(
        algorithm=config, token_budget=8 * PAGE, sink_tokens=PAGE, local_tokens=PAGE,
        dense_layers=1, buffer_ratio=1.0,
    ))  # fmt: skip
    _run(sparse, PROMPTS, decodes=2, check=check, seed=5, holder=holder)
    assert {rid for rid, _ in checked} == set(PROMPTS)
