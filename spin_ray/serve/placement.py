"""Where a request's KV fits: predicted working sets and the ranking of engine replicas.

Pure functions over frozen dataclasses. Replicas report `ReplicaStats` (router.py reads them from
Ray Serve's routing stats); the router adds what it sent each replica since that report and asks
`rank_replicas` for an order. Tests drive these functions with tables.

Units are the engine's own: a host page holds `page_size` tokens of a sequence's KV (every
offloaded layer and KV head); an HBM page is a page of the dense pool, or on a sparse replica a
working-set slot (one page of every offloaded layer and KV head).

Expected output of a request: min(max_tokens, O), where O is what the deployment has seen —
the largest of the fresh replicas' reported 90th percentile of their recent requests' output
lengths (`ReplicaStats.output_tokens_p90`, over their last `OUTPUT_HISTORY` finished
requests) — or, before any replica has finished one, the deployment's configured
`default_output_tokens`. A chat request without max_tokens may generate to the end of the
context, but reserving all of it would make every such request look too big to fit.

Working set of a request whose context is C = prompt_tokens + expected output tokens,
P = ceil(C / page_size):

- dense replica (all KV in HBM):  HBM wanted = HBM floor = P, host = 0.
- sparse replica (the context in the host tier, HBM slots for what attention reads), with the
  engine's own `PageBudget` (spin_ray/sparse/budget.py):
      host   = P
      M      = min(P, sink pages + local-window pages + top-k pages)   attended per step, where
               top-k pages = ceil(B / page_size) − sink − local pages and B = token_budget
               tokens (or ceil(token_budget × C) for a fraction); M = P for attend-all modes
      floor  = min(P, ceil(M × (1 + min_buffer_ratio)))                 what admission needs
      wanted = min(P, ceil(M × (1 + buffer_ratio)), max(cap, floor))    selection + LRU buffer
               (cap: `PageBudget.max_target_pages`, what fused retrieval holds)
  (modes without a buffer: wanted = floor = M).

Free capacity of a replica, per tier: total − committed (the working sets of the requests it
holds, as of its report) − the working sets of requests this router sent it that the report
does not list (sent after it, or still on their way when it was taken; matched by request id,
so no clocks are compared).

Fit level of a request on a replica:
    2  wanted HBM ≤ free HBM and host ≤ free host      (fits with its full buffer)
    1  floor HBM ≤ free HBM and host ≤ free host       (fits; buffers shrink toward floors)
    0  otherwise                                       (it would wait or preempt)

Load of a replica: (requests running + waiting + sent and not in the report,
                    context tokens held + context tokens sent and not in the report), compared
                    in order; a request's context tokens are its prompt + max_tokens.

Ranking (first rank is tried first; Ray Serve picks the replica with the shortest queue within
a rank and moves to the next rank when every replica of a rank is full):
    1. replicas with fresh stats at fit level 2, least loaded first, then those at level 1;
    2. replicas without fresh stats (missing or older than `stale_after_s`), as one rank;
    3. only when no replica is in 1. or 2.: every replica at level 0, least loaded first.
    Replicas of equal fit level and equal load share a rank. With no fresh stats at all, every
    replica is in one rank: plain least-loaded by queue length.
A replica that cannot hold the request is therefore never chosen while another one can.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from spin_ray.engine.kv_layout import KVLayout
from spin_ray.sparse.budget import PageBudget


@dataclass(frozen=True)
class WorkingSetDemand:
    """What the router knows of a request before placing it."""

    prompt_tokens: int
    """Tokens of the prompt (after the chat template)."""
    max_tokens: int
    """Most tokens the request may generate."""
    expected_output_tokens: int | None = None
    """Tokens it is expected to generate (see the module docstring); None: max_tokens."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: must be >= 1, got {self.prompt_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.expected_output_tokens is not None and self.expected_output_tokens < 1:
            raise ValueError(
                f"expected_output_tokens: must be >= 1, got {self.expected_output_tokens}"
            )

    @property
    def context_tokens(self) -> int:
        """Prompt and expected output: what the request is expected to hold."""
        expected = self.expected_output_tokens or self.max_tokens
        return self.prompt_tokens + min(self.max_tokens, expected)

    def expecting(self, output_tokens: int) -> WorkingSetDemand:
        """This demand, expected to generate `output_tokens` (at most max_tokens)."""
        return dataclasses.replace(self, expected_output_tokens=max(1, output_tokens))


@dataclass(frozen=True)
class WorkingSet:
    """Pages a request needs on a replica."""

    hbm_pages: int
    """HBM pages it wants: selection plus buffer (dense: the whole context)."""
    hbm_floor_pages: int
    """HBM pages it cannot run without (buffer shrunk to zero)."""
    host_pages: int
    """Host-tier pages for its whole context (0 on a dense replica)."""


@dataclass(frozen=True)
class ReplicaStats:
    """What an engine replica reports for routing (`SpinEngine.record_routing_stats`)."""

    timestamp: float
    """`time.time()` when the report was made."""
    layout: KVLayout
    hbm_pages_total: int
    """HBM-tier capacity in pages."""
    hbm_pages_committed: int
    """Working sets (wanted HBM pages) of the requests the replica holds, or the pages in use
    if more."""
    host_pages_total: int
    """Host-tier capacity in pages (0 when the engine has no host tier)."""
    host_pages_committed: int
    """Host pages of the requests the replica holds (whole contexts), or the pages in use if
    more."""
    num_running: int
    """Requests the engine is running."""
    num_waiting: int
    """Requests queued in the engine (admitted when their pages fit)."""
    running_tokens: int
    """Context tokens (prompt + max_tokens) of the requests the replica holds: the measure
    the router counts for the requests it sent that the report does not list, so both sides
    of the load compare alike (tokens generated so far would make a replica look lighter the
    moment its report includes a long request)."""
    request_ids: tuple[str, ...] = ()
    """Ids of the requests the replica holds (those the committed pages and `running_tokens`
    count): a request the router sent counts on top of the report unless listed here."""
    hbm_pages_used: int = 0
    """Pages in use now (for dashboards; fit uses `hbm_pages_committed`)."""
    host_pages_used: int = 0
    requests_aborted: int = 0
    """Requests aborted unfinished since the replica started (client gone, cancelled)."""
    output_tokens_p90: int | None = None
    """90th percentile of the output lengths of its last `OUTPUT_HISTORY` finished requests;
    None before the first."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReplicaStats:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        layout = dict(values["layout"])
        if layout.get("budget") is not None:
            layout["budget"] = PageBudget(**layout["budget"])
        values["layout"] = KVLayout(**layout)
        values["request_ids"] = tuple(values.get("request_ids", ()))
        return cls(**values)


OUTPUT_HISTORY = 256
"""Finished requests whose output lengths a replica keeps for `output_tokens_p90`."""


class OutputLengths:
    """The output lengths of a replica's last `OUTPUT_HISTORY` finished requests."""

    def __init__(self) -> None:
        self.recent: deque[int] = deque(maxlen=OUTPUT_HISTORY)

    def add(self, num_tokens: int) -> None:
        self.recent.append(num_tokens)

    def p90(self) -> int | None:
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def expected_output_tokens(
    stats: Iterable[ReplicaStats | None], now: float, stale_after_s: float, default: int
) -> int:
    """The largest p90 output length the fresh replicas report, or `default` if none does."""
    observed = [
        s.output_tokens_p90
        for s in stats
        if s is not None and now - s.timestamp <= stale_after_s and s.output_tokens_p90
    ]
    return max(observed, default=default)


@dataclass(frozen=True)
class SentRequest:
    """A request this router sent to a replica and that has not completed yet."""

    request_id: str
    """The engine request's id (what the replica lists in `ReplicaStats.request_ids`)."""
    sent_at: float
    """`time.time()` when it was sent."""
    working_set: WorkingSet
    context_tokens: int


def predict_working_set(demand: WorkingSetDemand, layout: KVLayout) -> WorkingSet:
    """The pages `demand` needs on a replica with `layout` (formula in the module docstring)."""
    context = demand.context_tokens
    pages = math.ceil(context / layout.page_size)
    budget = layout.budget
    if budget is None:
        return WorkingSet(hbm_pages=pages, hbm_floor_pages=pages, host_pages=0)
    return WorkingSet(
        hbm_pages=budget.target_pages(context),
        hbm_floor_pages=budget.floor_pages(context),
        host_pages=pages,
    )


def unreported(stats: ReplicaStats, sent: Sequence[SentRequest]) -> list[SentRequest]:
    """The sent requests the report does not count (not among the ids it lists)."""
    listed = set(stats.request_ids)
    return [s for s in sent if s.request_id not in listed]


def free_pages(stats: ReplicaStats, sent: Sequence[SentRequest]) -> tuple[int, int]:
    """(free HBM pages, free host pages) after the sent requests the report does not count."""
    later = [s.working_set for s in unreported(stats, sent)]
    hbm = stats.hbm_pages_total - stats.hbm_pages_committed - sum(w.hbm_pages for w in later)
    host = stats.host_pages_total - stats.host_pages_committed - sum(w.host_pages for w in later)
    return hbm, host


def fit_level(need: WorkingSet, free_hbm: int, free_host: int) -> int:
    """2: fits with its buffer; 1: fits at its HBM floor; 0: does not fit."""
    if need.host_pages > free_host:
        return 0
    if need.hbm_pages <= free_hbm:
        return 2
    if need.hbm_floor_pages <= free_hbm:
        return 1
    return 0


def load_key(stats: ReplicaStats, sent: Sequence[SentRequest]) -> tuple[int, int]:
    """(requests, tokens) on the replica, counting what was sent and the report does not."""
    later = unreported(stats, sent)
    requests = stats.num_running + stats.num_waiting + len(later)
    tokens = stats.running_tokens + sum(s.context_tokens for s in later)
    return requests, tokens


def rank_replicas(
    demand: WorkingSetDemand,
    stats: Mapping[str, ReplicaStats | None],
    sent: Mapping[str, Sequence[SentRequest]],
    now: float,
    stale_after_s: float,
) -> list[list[str]]:
    """Ranks of replica ids for `demand`, best first (rules in the module docstring).

    `stats` maps every candidate replica to its last report (None if it sent none); `sent` maps
    replica ids to the requests this router sent there that have not completed."""
    fresh = {
        rid: s for rid, s in stats.items() if s is not None and now - s.timestamp <= stale_after_s
    }
    unknown = [rid for rid in stats if rid not in fresh]
    scored: dict[int, list[tuple[tuple[int, int], str]]] = {2: [], 1: [], 0: []}
    for rid, s in fresh.items():
        replica_sent = sent.get(rid, ())
        need = predict_working_set(demand, s.layout)
        level = fit_level(need, *free_pages(s, replica_sent))
        scored[level].append((load_key(s, replica_sent), rid))

    ranks = _ranks_by_load(scored[2]) + _ranks_by_load(scored[1])
    if unknown:
        ranks.append(unknown)
    if not ranks:
        ranks = _ranks_by_load(scored[0])
    return ranks


def _ranks_by_load(scored: list[tuple[tuple[int, int], str]]) -> list[list[str]]:
    """Least loaded first; equal loads share a rank."""
    scored = sorted(scored)
    return [[rid for _, rid in group] for _, group in groupby(scored, key=lambda x: x[0])]
