"""The sparse, two-tier KV cache inside the engine, on spin-tiny (CPU): with a budget covering
the whole context every algorithm and mode generates exactly the dense tokens, also when both
tiers are smaller than the batch's KV (queueing and preemption); with a small budget every
request finishes, pages cross the tiers and the HBM buffer hits."""

from __future__ import annotations

import pytest
import torch

from spin_ray import SamplingParams
from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.sparse import (
    ALGORITHMS,
    KVStats,
    QuestConfig,
    SeerConfig,
    ShadowKVConfig,
    SparseConfig,
)
from spin_ray.sparse.algorithm_config import ALGORITHM_CONFIGS
from spin_ray.sparse.backend import SpinAttentionBackend
from spin_ray.sparse.presets import preset

PAGE = 8
PROMPT_LENS = (90, 140, 200)
MAX_TOKENS = 10
SMALL_PARTITIONS = {
    "seer": dict(block_size=2 * PAGE),
    "retroinfer": dict(segment_tokens=8 * PAGE, kmeans_iters=3),
}
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts(lengths=PROMPT_LENS):
    return [
        {"prompt_token_ids": [(i * 31 + j * 17) % 250 + 3 for j in range(n)]}
        for i, n in enumerate(lengths)
    ]


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def dense_tokens():
    from spin_ray import LLM

    llm = LLM(model="spin-tiny", device="cpu", page_size=PAGE, progress=False)
    assert isinstance(llm.llm_engine.backend, DenseAttentionBackend)
    return _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False))


def _sparse_llm(make_llm, **kwargs):
    """A sparse engine with per-layer checks of what the manager guarantees (off in
    production: they synchronise)."""
    kwargs.setdefault("page_size", PAGE)
    kwargs.setdefault("check_invariants", True)
    kwargs.setdefault("dense_layers", 1)
    llm = make_llm(model="spin-tiny", **kwargs)
    assert isinstance(llm.llm_engine.backend, SpinAttentionBackend)
    return llm


def _assert_tiers_empty(llm):
    manager = llm.llm_engine.page_tables
    assert manager.slot_pool.num_free == manager.slot_pool.num_pages
    assert manager.residency.segments_in_use == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_full_budget_equals_dense_with_tiers_smaller_than_the_batch(
    make_llm, dense_tokens, algorithm
):
    """Budget = the whole context, both tiers too small for the batch (the prompts alone need
    55 of the 56 HBM slots and of the 57 CPU pages): requests queue and get preempted, pages
    are fetched from the CPU tier, and the tokens are still exactly dense's."""
    kv_pages = sum(-(-(n + MAX_TOKENS) // PAGE) for n in PROMPT_LENS)
    llm = _sparse_llm(
        make_llm,
        sparse=ALGORITHM_CONFIGS[algorithm](**SMALL_PARTITIONS.get(algorithm, {})),
        token_budget=1.0,
        gpu_cache_tokens=56 * PAGE,
        cpu_cache_tokens=57 * PAGE,
    )
    assert kv_pages > 57
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert _tokens(outputs) == dense_tokens
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    stats = llm.kv_stats()
    assert stats.lookups > 0 and stats.hits > 0
    assert stats.h2d_bytes > 0 and stats.d2h_bytes > 0
    _assert_tiers_empty(llm)


@pytest.mark.parametrize("name", ["sparse-naive", "dense-offload"])
def test_baseline_presets_equal_dense_at_full_budget(make_llm, dense_tokens, name):
    config = preset(name, SparseConfig(algorithm="quest", token_budget=1.0, dense_layers=1))
    llm = _sparse_llm(make_llm, sparse=config, dense_layers=config.dense_layers)
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == dense_tokens
    stats = llm.kv_stats()
    assert stats.lookups > 0 and stats.hits == 0, "no buffer: every page is fetched"
    assert stats.h2d_bytes >= stats.lookups * llm.llm_engine.backend.host.page_bytes


@pytest.mark.parametrize("algorithm", ["quest", "retroinfer"])
def test_small_budget_finishes_crosses_tiers_and_hits_the_buffer(make_llm, algorithm):
    """A 32-token budget over 300–400-token contexts: every request finishes, pages cross both
    ways, the buffer both hits and evicts; without the buffer (sparse-naive) the same pages
    are chosen, so the tokens agree, but every one is fetched again each step."""
    prompts = _prompts((300, 360, 410))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    retro = dict(segment_tokens=16 * PAGE, kmeans_iters=3) if algorithm == "retroinfer" else {}
    common = dict(
        sparse=ALGORITHM_CONFIGS[algorithm](**retro),
        token_budget=32,
        sink_tokens=PAGE,
        local_tokens=2 * PAGE,
        buffer_ratio=1.0,
    )
    spin = _sparse_llm(make_llm, **common)
    outputs = spin.generate(prompts, params, use_tqdm=False)
    assert all(o.finished and len(o.outputs[0].token_ids) == 16 for o in outputs)
    stats = spin.kv_stats()
    assert isinstance(stats, KVStats)
    assert 0 < stats.hits < stats.lookups
    assert stats.h2d_bytes > 0 and stats.d2h_bytes > 0 and stats.evictions > 0
    assert stats.cpu_pages_used == 0 and stats.gpu_pages_used == 0  # all released
    assert stats.cpu_pages_total > 0 and stats.gpu_pages_total > 0
    _assert_tiers_empty(spin)

    naive = _sparse_llm(make_llm, tiers="sparse-naive", **common)
    assert _tokens(naive.generate(prompts, params, use_tqdm=False)) == _tokens(outputs)
    assert naive.kv_stats().lookups == stats.lookups
    assert naive.kv_stats().h2d_bytes > stats.h2d_bytes


def test_abort_mid_decode_frees_both_tiers(make_llm):
    llm = _sparse_llm(make_llm, sparse="shadowkv", token_budget=48)
    engine = llm.llm_engine
    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"r{i}", prompt, GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.kv_stats().gpu_pages_used > 0
    engine.abort_request("r1")
    engine.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    _assert_tiers_empty(llm)


def test_flat_keyword_arguments_build_the_config(make_llm):
    llm = _sparse_llm(
        make_llm, sparse="quest", token_budget=0.25, sink_tokens=16, local_tokens=24,
        buffer_ratio=3.0, min_buffer_ratio=2.0, gpu_cache_tokens=4096, cpu_cache_tokens=8192,
        fused_retrieve=False,
    )  # fmt: skip
    config = llm.llm_engine.config.sparse
    assert (config.algorithm, config.tiers, config.token_budget) == (QuestConfig(), "spin", 0.25)
    assert (config.sink_tokens, config.local_tokens, config.dense_layers) == (16, 24, 1)
    assert (config.buffer_ratio, config.min_buffer_ratio) == (3.0, 2.0)
    assert (config.gpu_cache_tokens, config.cpu_cache_tokens) == (4096, 8192)
    assert (config.fused_retrieve, config.check_invariants) == (False, True)
    dense = make_llm(model="spin-tiny", page_size=PAGE)  # no sparse settings: dense
    assert isinstance(dense.llm_engine.backend, DenseAttentionBackend)
    assert dense.kv_stats().lookups == 0
    shadowkv = _sparse_llm(make_llm, sparse={"algorithm": {"name": "shadowkv", "chunk_size": 4}})
    assert shadowkv.llm_engine.config.sparse.algorithm == ShadowKVConfig(chunk_size=4)


@pytest.mark.parametrize(
    "fields,name",
    [
        (dict(algorithm="nope"), "algorithm"),
        (dict(tiers="offload"), "tiers"),
        (dict(token_budget=0), "token_budget"),
        (dict(token_budget=1.5), "token_budget"),
        (dict(buffer_ratio=-1.0), "buffer_ratio"),
        (dict(min_buffer_ratio=-1.0), "min_buffer_ratio"),
        (dict(local_tokens=0), "local_tokens"),
        (dict(segment_pages=3), "segment_pages"),
    ],
)
def test_bad_sparse_settings_raise_value_error_naming_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        SparseConfig(**fields)


def test_partition_sizes_must_fit_the_page_size(make_llm):
    with pytest.raises(ValueError, match="block_size"):
        make_llm(model="spin-tiny", sparse=SeerConfig(block_size=8))
    with pytest.raises(ValueError, match="dense_layers"):
        make_llm(model="spin-tiny", sparse="quest", dense_layers=4)


@pytest.mark.parametrize("gpu_pages", [256, 40])
def test_chunked_prefill_keeps_the_prompt_in_hbm_when_slots_allow(
    make_llm, dense_tokens, monkeypatch, gpu_pages
):
    """Prompts prefilled in 24-token chunks at full budget: with slots to spare each request's
    chunks keep its prompt in HBM prefill slots and no prefix is read back from the CPU tier;
    with 40 slots the 140- and 200-token prompts cannot be held (their chunks read the prefix
    back). Either way the tokens are exactly dense's and every slot comes back, and every chunk
    over a prefix attends over K/V laid out as the dense layers gather them (token-major:
    strides that do not change with the context's length, which cuDNN compiles a kernel for)."""
    reads, layouts = [], set()
    llm = _sparse_llm(
        make_llm,
        sparse="quest",
        token_budget=1.0,
        max_num_batched_tokens=24,
        gpu_cache_tokens=gpu_pages * PAGE,
    )
    backend = llm.llm_engine.backend
    read_ahead = backend.host.read_ahead
    monkeypatch.setattr(
        backend.host,
        "read_ahead",
        lambda layer, pages: reads.append(layer) or read_ahead(layer, pages),
    )
    attend = backend.prefill.attend

    def record_layout(q, ctx_k, ctx_v, scale):  # q [n, Hq, D]; ctx [Hkv, T, D]
        if ctx_k.shape[1] > q.shape[0]:  # a chunk over a prefix
            layouts.add((ctx_k.stride(), ctx_v.stride()))
        return attend(q, ctx_k, ctx_v, scale)

    monkeypatch.setattr(backend.prefill, "attend", record_layout)
    held = []
    hold_prefill = backend.manager.hold_prefill
    monkeypatch.setattr(
        backend.manager, "hold_prefill", lambda rid: held.append(r := hold_prefill(rid)) or r
    )
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == dense_tokens
    if gpu_pages == 256:
        assert reads == [] and len(held) == 3 and None not in held
    else:
        assert reads and None in held
    assert backend.manager.prefill_slots == {}
    _assert_tiers_empty(llm)
    heads, dim = backend.host.k.shape[2], backend.host.k.shape[4]
    assert layouts == {((dim, heads * dim, 1), (dim, heads * dim, 1))}


def test_min_buffer_ratio_bounds_the_batch_by_hbm_and_keeps_the_tokens(make_llm):
    """Admission needs each request's selection x (1 + min_buffer_ratio) HBM slots: with 80
    slots, a 5-page selection (sink, local, top-k) admits every prompt at ratio 1 (10 slots
    each) but two at a time at ratio 6 (35 slots each); the selection, hence the tokens, are
    the same."""
    prompts = _prompts((300, 360, 410, 330))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {}
    for ratio in (1.0, 6.0):
        llm = _sparse_llm(
            make_llm, sparse="quest", token_budget=32, sink_tokens=PAGE, local_tokens=PAGE,
            buffer_ratio=6.0, min_buffer_ratio=ratio, gpu_cache_tokens=80 * PAGE,
        )  # fmt: skip
        engine = llm.llm_engine
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        outputs, most = {}, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[out.request_id] = out
            most = max(most, engine.num_running)
        results[ratio] = (most, [outputs[str(i)].outputs[0].token_ids for i in range(4)])
        _assert_tiers_empty(llm)
    assert results[1.0][0] == 4 and results[6.0][0] == 2
    assert results[1.0][1] == results[6.0][1]


@pytest.mark.parametrize("lookahead", [False, True])
def test_residency_tables_are_sized_before_serving(make_llm, lookahead):
    """The engine sizes the residency tables for max_num_seqs requests of max_model_len tokens
    when it is built, so serving never reallocates them (a reallocation makes every CUDA graph
    stale): the generation stays put through a batch of requests that fills the batch and the
    longest context, also with lookahead's second retrieval per layer."""
    llm = _sparse_llm(
        make_llm, sparse="quest", token_budget=32, sink_tokens=PAGE, local_tokens=PAGE,
        max_num_seqs=4, max_model_len=640, gpu_cache_tokens=4096, cpu_cache_tokens=8192,
        lookahead=lookahead,
    )  # fmt: skip
    residency = llm.llm_engine.page_tables.residency
    generation = residency.generation
    assert residency.directory.shape[0] == 4
    assert residency.dir_len * residency.segment_pages * PAGE >= 640
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    llm.generate(_prompts((600, 500, 450, 300)), params, use_tqdm=False)
    assert residency.generation == generation
    _assert_tiers_empty(llm)


LOOKAHEAD_COMMON = dict(
    token_budget=32,
    sink_tokens=PAGE,
    local_tokens=2 * PAGE,
    buffer_ratio=1.0,
)


@pytest.mark.parametrize("algorithm, share", [("quest", 1.0), ("shadowkv", 1.0), ("quest", 0.5)])
def test_lookahead_fetches_one_layer_early_and_keeps_the_tokens(make_llm, algorithm, share):
    """With lookahead every offloaded layer's pages (or the best-scored `share` of its top-k)
    are also selected one layer early, from a predicted query, placed and fetched; the layer
    still attends over its own selection, so the tokens, and the real lookups, are those of
    the engine without it, with buffers small enough that both retrievals evict."""
    prompts = _prompts((300, 360, 410))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = {}
    for lookahead in (False, True):
        ahead = dict(lookahead=True, lookahead_share=share) if lookahead else {}
        llm = _sparse_llm(make_llm, sparse=algorithm, **ahead, **LOOKAHEAD_COMMON)
        runs[lookahead] = (_tokens(llm.generate(prompts, params, use_tqdm=False)), llm.kv_stats())
        _assert_tiers_empty(llm)
    (plain, plain_stats), (ahead, ahead_stats) = runs[False], runs[True]
    assert ahead == plain
    assert ahead_stats.lookups == plain_stats.lookups
    assert plain_stats.prefetched_bytes == 0 and ahead_stats.prefetched_bytes > 0
    assert ahead_stats.h2d_bytes > ahead_stats.prefetched_bytes
    assert ahead_stats.evictions > 0


def _exact_lookahead_stats(make_llm, share: float):
    """KV stats of a lookahead whose predicted queries are the real ones: with every layer's
    attention and MLP output zeroed, each layer's input is the embedding."""
    common = {**LOOKAHEAD_COMMON, "token_budget": 11 * PAGE}  # top-k: 8 pages
    llm = _sparse_llm(make_llm, sparse="quest", lookahead=True, lookahead_share=share, **common)
    for layer in llm.llm_engine.model.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm.generate(_prompts((300, 360, 410)), params, use_tqdm=False)
    _assert_tiers_empty(llm)
    return llm.kv_stats()


def test_lookahead_with_exact_predictions_leaves_every_real_lookup_a_hit(make_llm):
    """Exact predictions: the lookahead brings in every page the layer then selects, and its
    real lookups all hit; fetching only the better half of the top-k early leaves the real
    retrieval some misses and moves fewer bytes early."""
    stats = _exact_lookahead_stats(make_llm, 1.0)
    assert stats.lookups > 0 and stats.hits == stats.lookups
    assert stats.prefetched_bytes > 0
    half = _exact_lookahead_stats(make_llm, 0.5)
    assert half.lookups == stats.lookups and half.hits < half.lookups
    assert 0 < half.prefetched_bytes < stats.prefetched_bytes


@pytest.mark.parametrize(
    "fields",
    [dict(tiers="sparse-naive"), dict(min_buffer_ratio=0.5), dict(buffer_ratio=0.5)],
)
def test_lookahead_needs_the_spin_mode_and_room_for_two_selections(fields):
    with pytest.raises(ValueError, match="lookahead"):
        SparseConfig(lookahead=True, **fields)


def test_a_cpu_tier_that_cannot_be_allocated_names_the_setting(make_llm, monkeypatch):
    """Pinning too much host memory fails with a CUDA out-of-memory error; the engine says
    which setting to lower and how much it asked for. Other errors pass through unchanged."""
    import spin_ray.engine.tiered_kv_cache as build

    def refuse(message):
        def host_tier(*args):
            raise torch.AcceleratorError(message)

        return host_tier

    monkeypatch.setattr(build, "HostTier", refuse("CUDA error: out of memory"))
    with pytest.raises(ValueError, match=r"cpu_cache_tokens: .* GiB of host memory \(4096 tokens"):
        _sparse_llm(make_llm, sparse="quest", cpu_cache_tokens=4096)
    monkeypatch.setattr(build, "HostTier", refuse("CUDA error: invalid argument"))
    with pytest.raises(torch.AcceleratorError, match="invalid argument"):
        _sparse_llm(make_llm, sparse="quest", cpu_cache_tokens=4096)
