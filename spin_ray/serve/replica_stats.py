"""Read every engine replica's `ReplicaStats` directly (for benchmarks, tests and operators):
the same report the router gets, fetched now instead of at the next polling period."""

from __future__ import annotations

import ray

from spin_ray.serve.placement import ReplicaStats

REPLICA_PREFIX = "SERVE_REPLICA::"
SERVE_NAMESPACE = "serve"


def engine_replica_stats(
    app_name: str, deployment: str = "SpinEngine", timeout_s: float = 10.0
) -> dict[str, ReplicaStats]:
    """Replica id → its stats, for every live replica of `deployment` in `app_name`. Replicas
    that do not answer within `timeout_s` (dead or starting) are left out."""
    prefix = f"{REPLICA_PREFIX}{app_name}#{deployment}#"
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(prefix)
    ]
    refs = {}
    for name in names:
        try:
            actor = ray.get_actor(name, namespace=SERVE_NAMESPACE)
        except ValueError:  # gone since the listing
            continue
        refs[name.removeprefix(prefix)] = actor.record_routing_stats.remote()
    stats = {}
    for replica_id, ref in refs.items():
        try:
            raw = ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            continue
        if raw:
            stats[replica_id] = ReplicaStats.from_dict(raw)
    return stats
