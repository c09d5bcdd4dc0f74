"""KV working-set placement: the formulas of spin_ray/serve/placement.py, written out per case."""

from __future__ import annotations

import math

import pytest

from spin_ray.serve.placement import (
    KVLayout,
    ReplicaStats,
    SentRequest,
    WorkingSet,
    WorkingSetDemand,
    fit_level,
    free_pages,
    load_key,
    predict_working_set,
    rank_replicas,
)

DENSE = KVLayout(page_size=16)
SPARSE = KVLayout(
    page_size=16,
    sparse=True,
    token_budget=256,
    sink_tokens=64,
    local_tokens=64,
    buffer_ratio=5.0,
    dense_layers=0,
    num_layers=32,
)


@pytest.mark.parametrize(
    "demand, layout, expected",
    [
        # dense: the whole context in HBM, nothing in the host tier
        (WorkingSetDemand(100, 28), DENSE, WorkingSet(8, 8, 0)),  # 128 tokens = 8 pages
        (WorkingSetDemand(100, 29), DENSE, WorkingSet(9, 9, 0)),  # 129 tokens → 9 pages
        # sparse, long context: M = (256+64+64)/16 = 24 pages, wanted 24×6 = 144, host = all
        (WorkingSetDemand(32000, 768), SPARSE, WorkingSet(144, 24, 2048)),
        # sparse, short context: the budget covers it all, HBM never exceeds the context
        (WorkingSetDemand(100, 60), SPARSE, WorkingSet(10, 10, 10)),
        # sparse, M×(1+r) capped at the context: M = 24, 6M = 144 > P = 100
        (WorkingSetDemand(1500, 100), SPARSE, WorkingSet(100, 24, 100)),
    ],
)
def test_predict_working_set(demand, layout, expected):
    assert predict_working_set(demand, layout) == expected


def test_predict_working_set_fraction_and_dense_layers():
    layout = KVLayout(
        page_size=16,
        sparse=True,
        token_budget=0.02,
        sink_tokens=0,
        local_tokens=0,
        buffer_ratio=1.0,
        dense_layers=2,
        num_layers=8,
    )
    demand = WorkingSetDemand(60000, 4000)  # C = 64000 tokens, P = 4000 pages
    budget = math.ceil(0.02 * 64000)  # 1280 tokens → M = 80 pages
    m, p, d = budget // 16, 4000, 2 / 8
    assert predict_working_set(demand, layout) == WorkingSet(
        hbm_pages=math.ceil(d * p + (1 - d) * min(p, 2 * m)),
        hbm_floor_pages=math.ceil(d * p + (1 - d) * m),
        host_pages=p,
    )


def _stats(
    timestamp=100.0,
    hbm_total=1000,
    hbm_committed=0,
    host_total=0,
    host_committed=0,
    running=0,
    waiting=0,
    tokens=0,
    layout=DENSE,
) -> ReplicaStats:
    return ReplicaStats(
        timestamp=timestamp,
        layout=layout,
        hbm_pages_total=hbm_total,
        hbm_pages_committed=hbm_committed,
        host_pages_total=host_total,
        host_pages_committed=host_committed,
        num_running=running,
        num_waiting=waiting,
        running_tokens=tokens,
    )


def _sent(at: float, hbm: int, host: int = 0, tokens: int = 0) -> SentRequest:
    return SentRequest(sent_at=at, working_set=WorkingSet(hbm, hbm, host), context_tokens=tokens)


@pytest.mark.parametrize(
    "stats, sent, expected",
    [
        (_stats(hbm_total=100, hbm_committed=30), [], (70, 0)),
        (_stats(hbm_total=100, host_total=500, host_committed=200), [], (100, 300)),
        # sent before the report: already in `committed`; after: subtracted
        (
            _stats(timestamp=100.0, hbm_total=100),
            [_sent(99.0, 40, 7), _sent(101.0, 25, 9)],
            (75, -9),
        ),
    ],
)
def test_free_pages(stats, sent, expected):
    assert free_pages(stats, sent) == expected


@pytest.mark.parametrize(
    "need, free_hbm, free_host, level",
    [
        (WorkingSet(60, 10, 100), 60, 100, 2),  # everything fits
        (WorkingSet(60, 10, 100), 59, 100, 1),  # only the floor fits: the buffer shrinks
        (WorkingSet(60, 10, 100), 10, 100, 1),
        (WorkingSet(60, 10, 100), 9, 100, 0),  # below the floor
        (WorkingSet(60, 10, 100), 500, 99, 0),  # host tier too small
        (WorkingSet(8, 8, 0), 8, 0, 2),  # dense, no host tier
    ],
)
def test_fit_level(need, free_hbm, free_host, level):
    assert fit_level(need, free_hbm, free_host) == level


def test_load_key_counts_requests_sent_since_the_report():
    stats = _stats(timestamp=100.0, running=2, waiting=1, tokens=500)
    sent = [_sent(99.0, 1, tokens=1000), _sent(100.5, 1, tokens=70), _sent(101.0, 1, tokens=30)]
    assert load_key(stats, sent) == (3 + 2, 500 + 100)


NOW = 100.0
SMALL = WorkingSetDemand(10, 6)  # 1 page
LONG = WorkingSetDemand(500, 300)  # 50 pages


@pytest.mark.parametrize(
    "name, demand, stats, sent, expected",
    [
        (
            "only one replica can hold the request, although it is the busier one",
            LONG,
            {
                "a": _stats(hbm_total=64, hbm_committed=40, running=1),
                "b": _stats(hbm_total=64, hbm_committed=10, running=3),
            },
            {},
            [["b"]],
        ),
        (
            "equal fit: least loaded first, by requests then tokens",
            SMALL,
            {
                "a": _stats(running=2),
                "b": _stats(running=1, tokens=900),
                "c": _stats(running=1, tokens=100),
            },
            {},
            [["c"], ["b"], ["a"]],
        ),
        (
            "equal fit and load share a rank (Ray Serve then picks by queue length)",
            SMALL,
            {"a": _stats(), "b": _stats()},
            {},
            [["a", "b"]],
        ),
        (
            "a request sent after the report counts as load and takes its pages",
            LONG,
            {"a": _stats(timestamp=NOW - 1, hbm_total=64), "b": _stats(hbm_total=64)},
            {"a": [_sent(NOW - 0.5, 50, tokens=800)]},
            [["b"]],
        ),
        (
            "full buffer beats floor-only fit, whatever the load",
            WorkingSetDemand(31000, 1000),  # 2000 pages; wanted 144, floor 24
            {
                "a": _stats(hbm_total=100, host_total=4000, layout=SPARSE),
                "b": _stats(hbm_total=1000, host_total=4000, running=5, layout=SPARSE),
            },
            {},
            [["b"], ["a"]],
        ),
        (
            "stale and missing stats: after the fitting replicas, before the others",
            LONG,
            {"a": _stats(hbm_total=64, running=4), "b": None, "c": _stats(timestamp=NOW - 60)},
            {},
            [["a"], ["b", "c"]],
        ),
        (
            "a replica that cannot hold it is left out while an unknown one might",
            LONG,
            {"a": _stats(hbm_total=10), "b": None},
            {},
            [["b"]],
        ),
        (
            "nothing fits anywhere: every replica, least loaded first",
            LONG,
            {"a": _stats(hbm_total=10, running=1), "b": _stats(hbm_total=10)},
            {},
            [["b"], ["a"]],
        ),
        (
            "no fresh stats at all: one rank, least loaded by queue length",
            SMALL,
            {"a": None, "b": _stats(timestamp=0.0)},
            {},
            [["a", "b"]],
        ),
    ],
)
def test_rank_replicas(name, demand, stats, sent, expected):
    assert rank_replicas(demand, stats, sent, now=NOW, stale_after_s=5.0) == expected, name


def test_replica_stats_round_trip():
    stats = _stats(layout=SPARSE, host_total=7)
    assert ReplicaStats.from_dict(stats.to_dict()) == stats


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt_tokens=0, max_tokens=1), "prompt_tokens"),
        (dict(prompt_tokens=1, max_tokens=0), "max_tokens"),
    ],
)
def test_demand_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WorkingSetDemand(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(page_size=0), "page_size"),
        (dict(page_size=16, token_budget=0), "token_budget"),
        (dict(page_size=16, buffer_ratio=-1), "buffer_ratio"),
        (dict(page_size=16, dense_layers=3, num_layers=2), "dense_layers"),
    ],
)
def test_layout_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KVLayout(**kwargs)
