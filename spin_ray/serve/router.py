"""The KV working-set request router for the `SpinEngine` deployment (Ray Serve
`RequestRouter`, set through the deployment's `request_router_config`).

Each engine replica reports `ReplicaStats` from `record_routing_stats`; Ray Serve's controller
polls it every `request_routing_stats_period_s` and hands it to every router as
`RunningReplica.routing_stats`. For each request (an `EngineRequest`, whose `demand` is its
prompt length and max_tokens) the router ranks the replicas with `placement.rank_replicas`:
fit first (free HBM and host pages, predicted working set), then load. It remembers what it
sent each replica since its last report, so a burst of requests does not all land on the replica
that looked emptiest. Requests without an `EngineRequest` (e.g. `model_info`) go to the least
loaded replica by queue length, as do all requests while no replica has fresh stats.

Timestamps of reports (replica clock) are compared with send times (router clock); keep the
cluster's clocks in sync (NTP) so "sent since the report" is right.
"""

from __future__ import annotations

import logging
import random
import time

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from spin_ray.serve.engine_client import EngineRequest
from spin_ray.serve.placement import (
    ReplicaStats,
    SentRequest,
    WorkingSetDemand,
    predict_working_set,
    rank_replicas,
)

logger = logging.getLogger(__name__)


class KVWorkingSetRouter(RequestRouter):
    """Routes each request to a replica where its predicted KV working set fits, least loaded
    first (see `spin_ray.serve.placement` for the formula)."""

    def initialize_state(self, stale_after_s: float = 5.0) -> None:
        """`stale_after_s`: stats older than this count as missing."""
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s: must be > 0, got {stale_after_s}")
        self.stale_after_s = stale_after_s
        self.sent: dict[ReplicaID, dict[str, SentRequest]] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # After every rank was tried (all full), back off before trying again.
            pending_request.routing_context.should_backoff = True
        demand = request_demand(pending_request)
        if demand is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        stats = {r.replica_id.unique_id: replica_stats(r) for r in candidate_replicas}
        sent = {
            r.replica_id.unique_id: list(self.sent.get(r.replica_id, {}).values())
            for r in candidate_replicas
        }
        ranks = rank_replicas(demand, stats, sent, time.time(), self.stale_after_s)
        chosen = []
        for rank in ranks:
            replicas = [by_id[rid] for rid in rank]
            random.shuffle(replicas)  # Ray Serve takes the first of equal queue lengths
            chosen.append(replicas)
        return chosen

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result
    ) -> None:
        demand = request_demand(pending_request)
        replica = self.curr_replicas.get(replica_id)
        stats = replica_stats(replica) if replica is not None else None
        if demand is None or stats is None:
            return
        self.sent.setdefault(replica_id, {})[pending_request.metadata.internal_request_id] = (
            SentRequest(
                sent_at=time.time(),
                working_set=predict_working_set(demand, stats.layout),
                context_tokens=demand.context_tokens,
            )
        )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        sent = self.sent.get(replica_id)
        if sent is not None:
            sent.pop(internal_request_id, None)
            if not sent:
                del self.sent[replica_id]


def request_demand(pending_request: PendingRequest | None) -> WorkingSetDemand | None:
    """The demand of the `EngineRequest` among the call's arguments, if there is one."""
    if pending_request is None:
        return None
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(arg, EngineRequest):
            return arg.demand
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
