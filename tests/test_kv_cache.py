"""The KV-cache contract (spin_ray/engine/kv_cache.py), kept the same way by every cache the
factory builds: capacity, page tables, usage for the router and stats for the metrics agree
while a request runs, and all goes back when it ends."""

from __future__ import annotations

import pytest

from spin_ray import SamplingParams
from spin_ray.sparse import SparseConfig
from spin_ray.sparse.presets import PRESETS, preset

SPIN = SparseConfig(
    algorithm="quest",
    token_budget=64,
    sink_tokens=16,
    local_tokens=32,
    dense_layers=1,
    cpu_cache_tokens=2048,
    gpu_cache_tokens=1024,
    buffer_ratio=2.0,
)
CACHES = {name: dict(sparse=preset(name, SPIN)) for name in PRESETS}
CACHES["dense"] = dict(num_pages=64)
OFFLOADS = {"spin", "sparse-naive", "dense-offload"}


@pytest.mark.parametrize("name", CACHES)
def test_every_cache_keeps_the_contract(make_llm, name):
    llm = make_llm(model="spin-tiny", max_model_len=1024, **CACHES[name])
    engine = llm.llm_engine
    kv = engine.kv_cache
    assert engine.page_tables is kv.page_tables and engine.backend is kv.backend
    assert kv.capacity_tokens >= engine.config.scheduler.max_model_len
    assert kv.layout.page_size == kv.page_tables.page_size == 16
    assert (kv.layout.budget is not None) == (name in OFFLOADS)
    idle = kv.usage()
    assert idle.hbm_pages_used == idle.host_pages_used == 0 and idle.hbm_pages_total > 0
    assert (idle.host_pages_total > 0) == (name in OFFLOADS)

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("r0", {"prompt_token_ids": [1 + i % 250 for i in range(300)]}, params)
    engine.step()
    running = kv.usage()
    stats = kv.stats()
    pages = len(kv.page_tables.table("r0"))
    assert pages == -(-300 // 16)  # the whole prompt, in the pool the page ids come from
    assert 0 < running.hbm_pages_used <= running.hbm_pages_total
    if name in OFFLOADS:  # the context in the host tier
        assert running.host_pages_used == pages
    else:  # every page in HBM
        assert running.hbm_pages_used == pages and running.host_pages_used == 0
    # stats count (layer, KV head) pages, usage the router's pages: one ratio for both
    assert stats.gpu_pages_used * running.hbm_pages_total == (
        running.hbm_pages_used * stats.gpu_pages_total
    )
    assert stats.cpu_pages_used * max(1, running.host_pages_total) == (
        running.host_pages_used * stats.cpu_pages_total
    )

    while engine.has_unfinished_requests():
        engine.step()
    done = kv.usage()
    assert done.hbm_pages_used == done.host_pages_used == 0
    assert kv.page_tables.table("r0") == []
    assert kv.stats().gpu_pages_used == 0
