"""The async engine loop and the engine replica's routing report, on real spin-tiny engines
(no Ray: `SpinEngine` is a plain class until Ray Serve wraps it)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import assert_cache_clean

from spin_ray import SamplingParams
from spin_ray.serve.async_engine import AsyncEngine
from spin_ray.serve.engine_client import EngineDeadError, EngineRequest
from spin_ray.serve.engine_deployment import SpinEngine
from spin_ray.serve.placement import predict_working_set

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


async def _collect(engine: AsyncEngine, request_id: str, prompt, params):
    return [out async for out in engine.generate(request_id, prompt, params)]


def test_deltas_add_up_to_the_offline_output(make_llm):
    llm = make_llm(model="spin-tiny", max_model_len=512, num_pages=64)
    prompts = ["Hello there", "A longer prompt crossing a page boundary........."]
    expected = llm.generate(prompts, GREEDY, use_tqdm=False)
    engine = AsyncEngine(llm.llm_engine)
    try:

        async def both():
            return await asyncio.gather(
                *(_collect(engine, f"r{i}", p, GREEDY) for i, p in enumerate(prompts))
            )

        for deltas, want in zip(asyncio.run(both()), expected):
            assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
            assert sum((d.outputs[0].token_ids for d in deltas), []) == want.outputs[0].token_ids
            assert "".join(d.outputs[0].text for d in deltas) == want.outputs[0].text
            assert deltas[-1].outputs[0].finish_reason == "length"
    finally:
        engine.shutdown()


def test_closing_the_stream_aborts_and_frees_pages(make_llm):
    llm = make_llm(model="spin-tiny", max_model_len=512, num_pages=64)
    engine = AsyncEngine(llm.llm_engine)
    pool = llm.llm_engine.page_tables.pool
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def open_then_leave():
        stream = engine.generate("r0", "x" * 40, long)
        await anext(stream)
        assert pool.num_used > 0
        await stream.aclose()
        # The abort runs before the next step: wait for the loop to go idle.
        while engine.engine.has_unfinished_requests() or pool.num_used:
            await asyncio.sleep(0.01)

    async def run_to_the_end():
        return [delta async for delta in engine.generate("r1", "x", SamplingParams(max_tokens=2))]

    try:
        asyncio.run(open_then_leave())
        assert engine.load().num_running == 0 and engine.load().num_aborted == 1
        assert_cache_clean(llm.llm_engine)
        assert asyncio.run(run_to_the_end())[-1].finished
        assert engine.load().num_aborted == 1, "a request that finished is not counted"
    finally:
        engine.shutdown()


def test_bad_input_raises_and_the_engine_keeps_serving(make_llm):
    llm = make_llm(model="spin-tiny", max_model_len=64, num_pages=8)
    engine = AsyncEngine(llm.llm_engine)
    try:
        with pytest.raises(ValueError, match="prompt_token_ids"):
            asyncio.run(_collect(engine, "bad", [10**6], GREEDY))
        with pytest.raises(ValueError, match="max_model_len"):
            asyncio.run(_collect(engine, "long", "x" * 100, GREEDY))
        assert asyncio.run(_collect(engine, "ok", "fine", GREEDY))[-1].finished
    finally:
        engine.shutdown()


def test_a_failing_step_reaches_every_caller(make_llm, monkeypatch):
    llm = make_llm(model="spin-tiny", max_model_len=64, num_pages=8)

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.llm_engine, "step", broken_step)
    engine = AsyncEngine(llm.llm_engine)
    with pytest.raises(EngineDeadError, match="device lost"):
        asyncio.run(_collect(engine, "r0", "hi", GREEDY))
    with pytest.raises(EngineDeadError):
        engine.check_health()
    with pytest.raises(EngineDeadError):  # later requests fail at once
        asyncio.run(_collect(engine, "r1", "hi", GREEDY))
    for request_id in ("r0", "r1"):
        llm.llm_engine.abort_request(request_id)  # the dead loop left them for us


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_pages=64),  # dense: all KV in the device pool
        dict(
            sparse="quest",
            token_budget=64,
            sink_tokens=16,
            local_tokens=32,
            cpu_cache_tokens=2048,
            gpu_cache_tokens=1024,
            buffer_ratio=2.0,  # a working set smaller than the context
        ),
    ],
)
def test_replica_reports_the_working_sets_it_holds(kwargs):
    replica = SpinEngine(
        dict(model="spin-tiny", device="cpu", max_model_len=1024, progress=False, **kwargs)
    )
    try:
        request = EngineRequest(
            "r0", [1 + i % 250 for i in range(599)], SamplingParams(max_tokens=3)
        )
        need = predict_working_set(request.demand, replica.layout)
        sparse = "sparse" in kwargs
        context_pages = -(-(599 + 3) // 16)  # prompt + max_tokens, 16-token pages
        if sparse:  # the whole context in the host tier, a working set of it in HBM
            assert need.host_pages == context_pages and 0 < need.hbm_pages < context_pages
        else:  # dense: the whole context in HBM
            assert (need.hbm_pages, need.host_pages) == (context_pages, 0)
        idle = replica.record_routing_stats()
        assert idle["hbm_pages_committed"] == idle["host_pages_committed"] == 0
        assert not idle["request_ids"]
        assert (idle["host_pages_total"] > 0) == sparse
        assert (idle["layout"]["budget"] is not None) == sparse

        async def run():
            reports = []
            async for _ in replica.generate(request):
                reports.append(replica.record_routing_stats())
            return reports

        reports = asyncio.run(run())
        for report in reports:
            assert report["hbm_pages_committed"] == need.hbm_pages
            assert report["host_pages_committed"] == need.host_pages
            # what the engine really holds never exceeds the prediction
            assert report["hbm_pages_used"] <= need.hbm_pages
            assert report["host_pages_used"] <= need.host_pages
            assert tuple(report["request_ids"]) == ("r0",)  # what the router matches by id
        assert reports[0]["num_running"] == 1
        if sparse:  # the context went to the host tier, the working set is smaller than it
            assert need.hbm_pages < need.host_pages
            assert reports[0]["host_pages_used"] == -(-(599 + 1) // 16)
        done = replica.record_routing_stats()
        assert done["hbm_pages_committed"] == done["hbm_pages_used"] == 0
        assert_cache_clean(replica.engine.engine)
    finally:
        replica.engine.shutdown()
