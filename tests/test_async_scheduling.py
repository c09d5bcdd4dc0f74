"""Async scheduling (`EngineConfig.async_scheduling`): each step is launched before the previous
step's tokens are read, its decode rows reading those tokens on the device. Whatever the
requests do — stop on a token or a string, end by max_tokens or max_model_len, ask for
logprobs, sample with seeds, get preempted or aborted with a token in flight — the outputs are
exactly those of the synchronous engine (spin-tiny, CPU; dense and the sparse cache)."""

from __future__ import annotations

import pytest

from spin_ray import SamplingParams

PAGE = 4


def _prompts(lengths, seed=0):
    return [
        {"prompt_token_ids": [(seed * 13 + i * 31 + j * 17) % 250 + 3 for j in range(n)]}
        for i, n in enumerate(lengths)
    ]


def _summary(outputs):
    """Everything a caller sees of each request's output."""
    rows = []
    for o in outputs:
        c = o.outputs[0]
        logprobs = None
        if c.logprobs is not None:
            logprobs = [(lp.token_id, round(lp.logprob, 5), sorted(lp.top)) for lp in c.logprobs]
        rows.append((c.token_ids, c.text, c.finish_reason, c.stop_reason, logprobs))
    return rows


def _mixed_params(free_tokens):
    """One request of each kind; `free_tokens`: a greedy run's tokens for the stop prompts."""
    greedy = dict(temperature=0.0, ignore_eos=True)
    return [
        SamplingParams(max_tokens=1, **greedy),  # its first token is its last
        SamplingParams(max_tokens=2, **greedy),
        SamplingParams(max_tokens=20, stop_token_ids=[free_tokens[5]], **greedy),
        SamplingParams(max_tokens=20, logprobs=3, **greedy),
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=400, **greedy),  # ends by max_model_len
        SamplingParams(max_tokens=17, temperature=0.0),  # may stop on EOS
    ]


ENGINES = {
    "dense": {},
    "spin": dict(sparse="quest", token_budget=32, dense_layers=1, buffer_ratio=2),
}


@pytest.mark.parametrize("engine_kind", list(ENGINES))
def test_async_outputs_equal_sync_outputs(make_llm, engine_kind):
    lengths = (5, 9, 30, 17, 12, 100, 23)
    prompts = _prompts(lengths, seed=1)
    common = dict(model="spin-tiny", page_size=PAGE, max_model_len=128, **ENGINES[engine_kind])
    common["max_num_batched_tokens"] = 32  # chunked prefill beside decodes
    sync = make_llm(async_scheduling=False, **common)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    free = sync.generate([prompts[2]], greedy)
    free_tokens = free[0].outputs[0].token_ids
    params = _mixed_params(free_tokens)
    expected = _summary(sync.generate(prompts, params, use_tqdm=False))
    assert expected[2][2:4] == ("stop", free_tokens[5])  # the cases happen as named
    assert expected[5][2] == "length" and lengths[5] + len(expected[5][0]) == 128

    asynchronous = make_llm(async_scheduling=True, **common)
    assert _summary(asynchronous.generate(prompts, params, use_tqdm=False)) == expected


def test_a_step_is_launched_before_the_last_ones_tokens_are_read(make_llm):
    """What makes it async: the step that samples a token returns nothing; the token is pending
    (counted, not known) until the next call, which has launched its own step first."""
    llm = make_llm(model="spin-tiny", page_size=PAGE)
    engine = llm.llm_engine
    engine.add_request("r", _prompts((6,))[0], SamplingParams(max_tokens=3, ignore_eos=True))
    request = engine.requests["r"]
    assert engine.step() == []  # the prompt runs; its token stays on the device
    assert (request.num_pending_tokens, request.output_token_ids) == (1, [])
    outputs = engine.step()  # launches the decode of the pending token, then reads it
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1]
    assert request.num_pending_tokens == 1 and request.num_computed_tokens == 7
    steps = 2
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
    assert outputs[0].finished and len(outputs[0].outputs[0].token_ids) == 3
    assert steps == 4  # prompt, 2 decodes, and a call that only reads the last token


def test_preemption_with_tokens_in_flight_gives_the_sync_tokens(make_llm):
    prompts = _prompts((20, 22, 24, 26), seed=2)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = {}
    for mode in (False, True):
        # 24 pages hold one finished request (12 pages) and a half: the scheduler must preempt
        llm = make_llm(
            model="spin-tiny", page_size=PAGE, max_model_len=64, num_pages=24,
            async_scheduling=mode,
        )  # fmt: skip
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs[mode] = [o.outputs[0].token_ids for o in outputs]
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert runs[True] == runs[False]


@pytest.mark.parametrize(
    "num_pages,first_max_tokens,lengths", [(7, 3, (3, 6, 7)), (7, 6, (5, 11)), (8, 6, (3, 6, 7))]
)
def test_a_request_waits_for_a_finishing_ones_pages_instead_of_preempting(
    make_llm, num_pages, first_max_tokens, lengths
):
    """Tight pages, the first request ending by length: async, its last token is still in
    flight when the next step is scheduled, so its pages are not back yet. A request that
    cannot grow then waits a step; preempting it (as these cases did) would recompute its
    context. As many preemptions as the synchronous engine, the same tokens."""
    prompts = _prompts(lengths, seed=4)
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = [SamplingParams(max_tokens=first_max_tokens, **greedy)] + [
        SamplingParams(max_tokens=12, **greedy)
    ] * (len(lengths) - 1)
    runs = {}
    for mode in (False, True):
        llm = make_llm(
            model="spin-tiny", page_size=PAGE, max_model_len=28, num_pages=num_pages,
            async_scheduling=mode,
        )  # fmt: skip
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs[mode] = (llm.llm_engine.num_preemptions, [o.outputs[0].token_ids for o in outputs])
    assert runs[True] == runs[False]


@pytest.mark.parametrize("engine_kind", list(ENGINES))
def test_abort_with_a_token_in_flight(make_llm, engine_kind):
    """Aborting a request whose token is still on the device drops that token and gives its
    pages back; the others go on to the sync engine's tokens."""
    prompts = _prompts((10, 14, 40), seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    common = dict(model="spin-tiny", page_size=PAGE, max_model_len=128, **ENGINES[engine_kind])
    expected = _summary(make_llm(async_scheduling=False, **common).generate(prompts, params))

    engine = make_llm(async_scheduling=True, **common).llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs = {}
    for _ in range(4):
        for o in engine.step():
            outputs[o.request_id] = o
    assert engine.requests["r1"].num_pending_tokens > 0
    engine.abort_request("r1")
    engine.check_integrity()
    assert not engine.page_tables.table("r1")
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.request_id != "r1"
            outputs[o.request_id] = o
    assert _summary([outputs["r0"], outputs["r2"]]) == [expected[0], expected[2]]
