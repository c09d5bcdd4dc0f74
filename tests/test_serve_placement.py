"""KV working-set placement: the formulas of spin_ray/serve/placement.py, written out per case."""

from __future__ import annotations

import json

import pytest

from spin_ray.engine.kv_layout import KVLayout
from spin_ray.serve.placement import (
    OUTPUT_HISTORY,
    OutputLengths,
    ReplicaStats,
    SentRequest,
    WorkingSet,
    WorkingSetDemand,
    expected_output_tokens,
    fit_level,
    free_pages,
    load_key,
    predict_working_set,
    rank_replicas,
)
from spin_ray.sparse.budget import PageBudget

DENSE = KVLayout(page_size=16)


def _budget(**overrides) -> PageBudget:
    fields = dict(
        page_size=16,
        token_budget=2048,
        sink_tokens=64,
        local_tokens=256,
        max_unindexed_tokens=32,
        attend_all=False,
        retains=True,
        buffer_ratio=5.0,
        min_buffer_ratio=1.0,
    )
    return PageBudget(**{**fields, **overrides})


SPARSE = KVLayout(page_size=16, budget=_budget())
# Per step: 4 sink pages (64 tokens) + 17 local pages (256 tokens, +1 for a partial page) +
# top-k pages ceil(2048 / 16) − 4 − 16 = 108 → M = 129 when the context has that many.


@pytest.mark.parametrize(
    "demand, layout, expected",
    [
        # dense: the whole context in HBM, nothing in the host tier
        (WorkingSetDemand(100, 28), DENSE, WorkingSet(8, 8, 0)),  # 128 tokens = 8 pages
        (WorkingSetDemand(100, 29), DENSE, WorkingSet(9, 9, 0)),  # 129 tokens → 9 pages
        # sparse, 32K context (P = 2048): wanted ceil(129 × 6) = 774, floor 129 × 2 = 258
        (WorkingSetDemand(32000, 768), SPARSE, WorkingSet(774, 258, 2048)),
        # sparse, short context (P = 63 < M): the whole context, never more
        (WorkingSetDemand(900, 100), SPARSE, WorkingSet(63, 63, 63)),
        # a fraction: B = ceil(0.02 × 64000) = 1280 tokens = 80 pages → top-k 60, M = 81
        (
            WorkingSetDemand(60000, 4000),
            KVLayout(16, _budget(token_budget=0.02)),
            WorkingSet(486, 162, 4000),
        ),
        # no buffer (sparse-naive): wanted = floor = M
        (
            WorkingSetDemand(32000, 768),
            KVLayout(16, _budget(retains=False)),
            WorkingSet(129, 129, 2048),
        ),
        # dense-offload: every page attended, none kept
        (
            WorkingSetDemand(32000, 768),
            KVLayout(16, _budget(attend_all=True, retains=False)),
            WorkingSet(2048, 2048, 2048),
        ),
    ],
)
def test_predict_working_set(demand, layout, expected):
    assert predict_working_set(demand, layout) == expected


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
    ids=(),
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
        request_ids=ids,
    )


def _sent(rid: str, at: float, hbm: int, host: int = 0, tokens: int = 0) -> SentRequest:
    working_set = WorkingSet(hbm, hbm, host)
    return SentRequest(request_id=rid, sent_at=at, working_set=working_set, context_tokens=tokens)


@pytest.mark.parametrize(
    "stats, sent, expected",
    [
        (_stats(hbm_total=100, hbm_committed=30), [], (70, 0)),
        (_stats(hbm_total=100, host_total=500, host_committed=200), [], (100, 300)),
        # listed in the report: already in `committed`; not listed: subtracted, whether
        # sent after the report or before it (still in flight when it was taken)
        (
            _stats(timestamp=100.0, hbm_total=100, ids=("r1",)),
            [_sent("r1", 99.0, 40, 7), _sent("r2", 101.0, 25, 9), _sent("r3", 99.5, 5, 1)],
            (70, -10),
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


def test_load_key_counts_sent_requests_the_report_does_not_list():
    stats = _stats(timestamp=100.0, running=2, waiting=1, tokens=500, ids=("r1",))
    sent = [_sent("r1", 99.0, 1, tokens=1000), _sent("r2", 100.5, 1, tokens=70),
            _sent("r3", 99.0, 1, tokens=30)]  # fmt: skip
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
            {"a": [_sent("r1", NOW - 0.5, 50, tokens=800)]},
            [["b"]],
        ),
        (
            "full buffer beats floor-only fit, whatever the load",
            WorkingSetDemand(32000, 768),  # wanted 774, floor 258, host 2048
            {
                "a": _stats(hbm_total=500, host_total=4000, layout=SPARSE),
                "b": _stats(hbm_total=1000, host_total=4000, running=5, layout=SPARSE),
            },
            {},
            [["b"], ["a"]],
        ),
        (
            "the host tier must hold the whole context",
            WorkingSetDemand(32000, 768),
            {
                "a": _stats(hbm_total=5000, host_total=2047, layout=SPARSE),
                "b": _stats(hbm_total=500, host_total=2048, running=5, layout=SPARSE),
            },
            {},
            [["b"]],
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
    stats = _stats(layout=SPARSE, host_total=7, ids=("r1", "r2"))
    assert ReplicaStats.from_dict(stats.to_dict()) == stats
    assert ReplicaStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


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


def test_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="page_size"):
        KVLayout(page_size=0)
    with pytest.raises(ValueError, match="budget"):
        KVLayout(page_size=32, budget=_budget())


def test_expected_output_is_the_largest_fresh_p90_or_the_default():
    def stats(p90, age_s):
        return ReplicaStats(
            timestamp=NOW - age_s, layout=DENSE, hbm_pages_total=1, hbm_pages_committed=0,
            host_pages_total=0, host_pages_committed=0, num_running=0, num_waiting=0,
            running_tokens=0, output_tokens_p90=p90,
        )  # fmt: skip

    reports = [stats(300, 1.0), stats(700, 1.0), stats(5000, 10.0), None]  # the 5000 is stale
    assert expected_output_tokens(reports, NOW, stale_after_s=5.0, default=1024) == 700
    assert expected_output_tokens([stats(None, 1.0), None], NOW, 5.0, default=1024) == 1024


def test_a_demand_expects_at_most_its_max_tokens():
    chat = WorkingSetDemand(prompt_tokens=100, max_tokens=8000)  # no max_tokens: the context
    assert chat.context_tokens == 8100
    assert chat.expecting(700).context_tokens == 800
    assert WorkingSetDemand(100, 50).expecting(700).context_tokens == 150
    with pytest.raises(ValueError, match="expected_output_tokens"):
        WorkingSetDemand(100, 50, expected_output_tokens=0)


def test_output_lengths_p90_over_the_last_requests():
    lengths = OutputLengths()
    assert lengths.p90() is None
    for n in range(1, 11):  # 1..10: the 9th of 10 sorted
        lengths.add(n)
    assert lengths.p90() == 9
    for _ in range(OUTPUT_HISTORY):  # only the last OUTPUT_HISTORY count
        lengths.add(100)
    assert lengths.p90() == 100
