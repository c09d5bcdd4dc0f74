"""The KV working-set request router for the `SpinEngine` deployment (Ray Serve
`RequestRouter`, set through the deployment's `request_router_config`).

Each engine replica reports `ReplicaStats` from `record_routing_stats`; Ray Serve's controller
polls it every `request_routing_stats_period_s` and hands it to every router as
`RunningReplica.routing_stats`. For each request (an `EngineRequest`, whose `demand` is its
prompt length and max_tokens) the router ranks the replicas with `placement.rank_replicas`:
fit first (free HBM and host pages, predicted working set), then load. Replicas with fresh stats
are offered to Ray Serve one at a time in that order (Ray takes the first whose queue is not
full). The router counts each request on its pick at once and on the replica Ray Serve reports
when it routes it, until it completes; requests the replica's last report does not list (by
request id: sent after it, or still in flight when it was taken) add to that report, so a
burst does not all land on the replica that looked emptiest. Requests without an
`EngineRequest` (e.g. `model_info`) go to the least loaded replica by queue length, as do all
requests while no replica has fresh stats.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from spin_ray.metrics.definitions import ROUTER_PLACEMENTS
from spin_ray.metrics.ray_sink import RaySink
from spin_ray.serve.engine_client import EngineRequest
from spin_ray.serve.placement import (
    ReplicaStats,
    SentRequest,
    WorkingSetDemand,
    expected_output_tokens,
    predict_working_set,
    rank_replicas,
)

logger = logging.getLogger(__name__)


@dataclass
class _Placement:
    """Where this router put (or is about to put) a request."""

    replica: str
    sent: SentRequest
    confirmed: bool
    """Ray Serve reported it routed there; unconfirmed entries are this router's own pick."""


class KVWorkingSetRouter(RequestRouter):
    """Routes each request to a replica where its predicted KV working set fits, least loaded
    first (see `spin_ray.serve.placement` for the formula)."""

    def initialize_state(
        self, stale_after_s: float = 5.0, default_output_tokens: int = 1024
    ) -> None:
        """`stale_after_s`: stats older than this count as missing. `default_output_tokens`:
        the output expected of a request until replicas report what they have seen."""
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s: must be > 0, got {stale_after_s}")
        if default_output_tokens < 1:
            raise ValueError(f"default_output_tokens: must be >= 1, got {default_output_tokens}")
        self.stale_after_s = stale_after_s
        self.default_output_tokens = default_output_tokens
        self.placements: dict[str, _Placement] = {}
        """Internal request id → its replica, until the request completes."""
        self.sink = RaySink()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # After every rank was tried (all full), back off before trying again.
            pending_request.routing_context.should_backoff = True
        request = engine_request(pending_request)
        if request is None or not candidate_replicas:
            return [candidate_replicas]
        try:
            return self._choose(candidate_replicas, pending_request, request)
        except Exception:  # a request the router cannot rank still gets a replica
            logger.exception("routing %s: fell back to the shortest queue", request.request_id)
            return [candidate_replicas]

    def _choose(self, candidate_replicas, pending_request, request) -> list[list[RunningReplica]]:
        now = time.time()
        self._forget_unconfirmed(now)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        stats = {rid: replica_stats(r) for rid, r in by_id.items()}
        demand = self._expected(request, stats.values(), now)
        sent = defaultdict(list)
        for placement in self.placements.values():
            sent[placement.replica].append(placement.sent)
        ranks = rank_replicas(demand, stats, sent, now, self.stale_after_s)
        fresh = {
            rid
            for rid, s in stats.items()
            if s is not None and s.timestamp >= now - self.stale_after_s
        }
        chosen: list[list[RunningReplica]] = []
        for rank in ranks:
            random.shuffle(rank)  # equals in random order
            if set(rank) <= fresh:  # one at a time, in our order
                chosen.extend([by_id[rid]] for rid in rank)
            else:  # no stats: Ray Serve picks the shortest queue
                chosen.append([by_id[rid] for rid in rank])
        best = ranks[0][0]
        if best in fresh:
            # Count it there now, so requests routed before the next report see it.
            self._place(pending_request, best, demand, stats[best], now, confirmed=False)
        return chosen

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result
    ) -> None:
        request = engine_request(pending_request)
        replica = self.curr_replicas.get(replica_id)
        stats = replica_stats(replica) if replica is not None else None
        if request is None:
            return
        now = time.time()
        fresh = stats is not None and stats.timestamp >= now - self.stale_after_s
        labels = {
            "engine_replica": replica_id.unique_id,
            "placement": "working_set" if fresh else "fallback",
        }
        self.sink.inc(ROUTER_PLACEMENTS, 1, labels)
        if stats is None:  # no layout to size it with
            self.placements.pop(pending_request.metadata.internal_request_id, None)
            return
        all_stats = [replica_stats(r) for r in self.curr_replicas.values()]
        demand = self._expected(request, all_stats, now)
        self._place(pending_request, replica_id.unique_id, demand, stats, now, confirmed=True)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.placements.pop(internal_request_id, None)

    def _expected(self, request: EngineRequest, stats, now: float) -> WorkingSetDemand:
        """The request's demand with the output length the replicas have seen."""
        expected = expected_output_tokens(
            stats, now, self.stale_after_s, self.default_output_tokens
        )
        return request.demand.expecting(expected)

    def _place(self, pending_request, replica: str, demand, stats, now, confirmed) -> None:
        self.placements[pending_request.metadata.internal_request_id] = _Placement(
            replica=replica,
            sent=SentRequest(
                request_id=engine_request(pending_request).request_id,
                sent_at=now,
                working_set=predict_working_set(demand, stats.layout),
                context_tokens=demand.context_tokens,
            ),
            confirmed=confirmed,
        )

    def _forget_unconfirmed(self, now: float) -> None:
        """Drop picks never confirmed (the request was cancelled, or went nowhere yet)."""
        for request_id, placement in list(self.placements.items()):
            if not placement.confirmed and placement.sent.sent_at < now - self.stale_after_s:
                del self.placements[request_id]


def engine_request(pending_request: PendingRequest | None) -> EngineRequest | None:
    """The `EngineRequest` among the call's arguments, if there is one."""
    if pending_request is None:
        return None
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(arg, EngineRequest):
            return arg
    return None


def replica_stats(replica: RunningReplica) -> ReplicaStats | None:
    """The replica's last report, or None if it has sent none (or one we cannot read)."""
    raw = replica.routing_stats
    if not raw:
        return None
    try:
        return ReplicaStats.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        logger.warning("unreadable routing stats from %s: %r", replica.replica_id, raw)
        return None
