"""Decode steps laid out for CUDA graphs — batch padded to a graph size, inputs in persistent
buffers, bucketed widths — run eagerly on the CPU (`DecodeGraphs(capture=False)`): the same
tokens, logprobs and cache statistics as the plain eager engine, dense and sparse. Capturing
and replaying needs CUDA: bench/decode_graphs_check.py compares the two on a GPU."""

from __future__ import annotations

import pytest
import torch

from spin_ray import SamplingParams
from spin_ray.device.step_buffers import bucket
from spin_ray.engine.decode_graphs import DecodeGraphs, graph_batch_sizes

PAGE = 8
PROMPT_LENS = (90, 140, 200, 60, 170)  # 5 sequences: padded to 8, then fewer as they finish
MAX_TOKENS = (6, 9, 12, 4, 10)


def _prompts():
    return [
        {"prompt_token_ids": [(i * 31 + j * 17) % 250 + 3 for j in range(n)]}
        for i, n in enumerate(PROMPT_LENS)
    ]


def _params():
    return [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
        for n in MAX_TOKENS
    ]


def _generate(llm):
    outputs = llm.generate(_prompts(), _params(), use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    logprobs = [[lp.logprob for lp in o.outputs[0].logprobs] for o in outputs]
    return tokens, logprobs


def _graph_layout(llm) -> DecodeGraphs:
    """Give the engine the graph path, without capturing (the CPU cannot), with a graph of
    its own size for batches up to 4 only, so that the 5 sequences run padded to 8."""
    engine = llm.llm_engine
    sched = engine.config.scheduler
    engine.decode_graphs = DecodeGraphs(
        engine.model,
        sched.max_num_seqs,
        engine.device,
        capture=False,
        page_width=engine.backend.graph_page_width(sched.max_model_len),
        sizes=graph_batch_sizes(sched.max_num_seqs, every_size_up_to=4),
    )
    return engine.decode_graphs


def test_graph_batch_sizes():
    """Every size up to 16 (the default), then the multiples of 8, and max_num_seqs."""
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(8) == list(range(1, 9))
    assert graph_batch_sizes(30) == [*range(1, 17), 24, 30]
    assert graph_batch_sizes(64) == [*range(1, 17), 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(30, every_size_up_to=4) == [1, 2, 3, 4, 8, 16, 24, 30]
    assert graph_batch_sizes(40, every_size_up_to=12) == [*range(1, 13), 16, 24, 32, 40]


def test_layout_pads_to_the_smallest_graph_size(make_llm):
    graphs = _graph_layout(make_llm(model="spin-tiny", page_size=PAGE, max_num_seqs=30))
    assert [graphs.layout(n).batch_size for n in (1, 2, 3, 5, 8, 9, 25, 30)] == [
        1, 2, 3, 8, 8, 16, 30, 30,
    ]  # fmt: skip
    # the engine's default sizes: no padding up to 16
    default = DecodeGraphs(graphs.model, 30, torch.device("cpu"), capture=False)
    assert [default.layout(n).batch_size for n in (1, 3, 5, 9, 16, 17, 25, 30)] == [
        1, 3, 5, 9, 16, 24, 30, 30,
    ]  # fmt: skip
    assert graphs.layout(31) is None


def _assert_same(eager, graph):
    assert graph[0] == eager[0]
    for a, b in zip(eager[1], graph[1]):
        assert a == pytest.approx(b, abs=1e-4)


def _count_split_steps(llm, monkeypatch) -> list[int]:
    """Record how many forwards each step of the engine runs."""
    engine = llm.llm_engine
    forwards, real = [], engine._forwards
    monkeypatch.setattr(engine, "_forwards", lambda s: forwards.append(len(real(s))) or real(s))
    return forwards


@pytest.mark.parametrize("chunk", [None, 64])
def test_dense_graph_layout_matches_eager(make_llm, monkeypatch, chunk):
    """`chunk`: prompts prefill in chunks of 64 tokens while earlier requests decode (mixed
    steps, which the dense engine runs as one eager forward)."""
    kwargs = dict(model="spin-tiny", page_size=PAGE, max_num_batched_tokens=chunk)
    eager = _generate(make_llm(**kwargs))
    llm = make_llm(**kwargs)
    graphs = _graph_layout(llm)
    forwards = _count_split_steps(llm, monkeypatch)
    _assert_same(eager, _generate(llm))
    assert graphs.generation == 0
    assert set(forwards) == {1}


@pytest.mark.parametrize("chunk", [None, 64])
def test_sparse_graph_layout_matches_eager(make_llm, monkeypatch, chunk):
    """Quest with a small budget and buffer (evictions every step), one dense layer: padding
    rows select, fetch and store nothing a real row sees, so tokens and every cache counter
    agree. `chunk`: prompts prefill in chunks of 64 tokens while earlier requests decode; the
    graph engine runs those mixed steps as a padded graph batch of the decodes, then an eager
    forward of the chunks, the eager engine as one forward."""
    kwargs = dict(model="spin-tiny", page_size=PAGE, sparse="quest", token_budget=4 * PAGE,
                  sink_tokens=PAGE, local_tokens=PAGE, buffer_ratio=1.0, dense_layers=1,
                  max_num_batched_tokens=chunk, check_invariants=True)  # fmt: skip
    eager_llm = make_llm(**kwargs)
    eager = _generate(eager_llm)
    llm = make_llm(**kwargs)
    graphs = _graph_layout(llm)
    forwards = _count_split_steps(llm, monkeypatch)
    _assert_same(eager, _generate(llm))
    assert (2 in forwards) == (chunk is not None), "mixed steps ran split"
    want, got = eager_llm.kv_stats(), llm.kv_stats()
    for field in ("lookups", "hits", "evictions", "h2d_bytes", "d2h_bytes"):
        assert getattr(got, field) == getattr(want, field), field
    assert want.evictions > 0 and 0 < want.hits < want.lookups
    assert graphs.generation == llm.llm_engine.backend.residency.generation > 0


def test_graphs_count_the_layouts_they_capture(make_llm):
    """One capture per distinct layout (batch size, table width), counted with its time; the
    same workload again meets only layouts it has, so it captures nothing more."""
    llm = make_llm(model="spin-tiny", page_size=PAGE)
    graphs = _graph_layout(llm)
    keys = []
    real_run = graphs.run
    graphs.run = lambda inputs, key: (
        keys.append((tuple(inputs.input_ids.shape), tuple(inputs.attention.page_table.shape)))
        or real_run(inputs, key)
    )
    _generate(llm)
    assert graphs.captures == len(set(keys)) > 1 and graphs.capture_seconds > 0
    assert len(keys) > graphs.captures  # most steps replay a layout met before
    first = graphs.captures
    _generate(llm)
    assert graphs.captures == len(set(keys)) == first


def test_sparse_graphs_keep_one_layout_per_batch_size(make_llm):
    """Spin's graph batches have a fixed page-table width (every context up to max_model_len)
    and fixed slot-list width (the largest buffer), so while contexts cross powers of two
    and buffers grow, a batch size keeps one key: a server captures (and compiles) once per
    batch size, not whenever a width bucket changes."""
    llm = make_llm(model="spin-tiny", page_size=PAGE, sparse="quest", token_budget=4 * PAGE,
                   sink_tokens=PAGE, local_tokens=PAGE, buffer_ratio=1.0, dense_layers=1,
                   max_model_len=512)  # fmt: skip
    graphs = _graph_layout(llm)
    engine = llm.llm_engine
    keys, own_widths = [], set()
    real_run = graphs.run

    def run(inputs, key):
        keys.append((tuple(inputs.input_ids.shape), tuple(inputs.attention.page_table.shape),
                     key.shapes))  # fmt: skip
        longest = max(inputs.attention.context_lens_cpu[: -inputs.attention.num_padded or None])
        own_widths.add(bucket(-(-longest // PAGE)))
        return real_run(inputs, key)

    graphs.run = run
    prompts = [{"prompt_token_ids": [(j * 17 + n) % 250 + 3 for j in range(n)]} for n in (60, 120)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (30, 16)]
    llm.generate(prompts, params, use_tqdm=False)  # 120 tokens pass 128 (16 pages) as they run
    assert graphs.page_width == 512 // PAGE
    assert len(own_widths) > 1  # the steps' own page widths crossed a power of two
    assert {k[1][1] for k in keys} == {graphs.page_width}
    slot_width = engine.backend.manager.slot_width
    assert slot_width > 1 and {k[2][0][1] for k in keys} == {slot_width}
    batch_sizes = {k[0] for k in keys}
    assert len(set(keys)) == len(batch_sizes) == graphs.captures > 1


def test_warm_up_captures_the_small_layouts_and_leaves_nothing_behind(make_llm):
    """`LLMEngine.warm_up` (what a server runs at start on CUDA): two requests over a prefix
    chunk decode as batches of 2 and 1 — those layouts are captured — and afterwards the engine
    holds nothing and generates what an engine that never warmed up generates."""
    kwargs = dict(model="spin-tiny", page_size=PAGE, sparse="quest", token_budget=4 * PAGE,
                  sink_tokens=PAGE, local_tokens=PAGE, buffer_ratio=1.0, dense_layers=1,
                  max_num_batched_tokens=64, max_model_len=512)  # fmt: skip
    fresh = _generate(make_llm(**kwargs))
    llm = make_llm(**kwargs)
    graphs = _graph_layout(llm)
    engine = llm.llm_engine
    layouts = []
    real_run = graphs.run
    graphs.run = lambda inputs, key: (
        layouts.append(inputs.input_ids.shape[0]) or real_run(inputs, key)
    )
    engine.warm_up()
    assert set(layouts) == {1, 2} and graphs.captures == 2
    assert engine.last_step_tokens == 1  # the last step decoded the longer request alone
    assert not engine.has_unfinished_requests() and engine.page_tables.pool.num_used == 0
    engine.check_integrity()
    _assert_same(fresh, _generate(llm))
    engine.add_request("busy", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="in flight"):
        engine.warm_up()
