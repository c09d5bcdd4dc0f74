"""`build_app`: the Ray Serve application (`serve run deploy/app.yaml`, `spin-ray serve`).

HTTP ─► OpenAIIngress ──(KV working-set router)──► SpinEngine × N (one per GPU)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from spin_ray.serve.app_config import AppConfig
from spin_ray.serve.engine_deployment import SpinEngine
from spin_ray.serve.ingress import OpenAIIngress

ROUTER_CLASS = "spin_ray.serve.router:KVWorkingSetRouter"


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The application for `args` (deploy/app.yaml documents every key; {} runs spin-tiny)."""
    config = AppConfig.from_args(args)
    engine = config.engine
    num_gpus = engine.resolved_num_gpus(cluster_has_gpus())
    scale = (
        {"num_replicas": engine.num_replicas}
        if engine.num_replicas is not None
        else {"autoscaling_config": engine.autoscaling_config}
    )
    engine_deployment = serve.deployment(SpinEngine).options(
        name="SpinEngine",
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": engine.num_cpus},
        max_ongoing_requests=engine.max_ongoing_requests,
        max_queued_requests=engine.max_queued_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"stale_after_s": engine.stale_after_s},
            request_routing_stats_period_s=engine.routing_stats_period_s,
            request_routing_stats_timeout_s=engine.stale_after_s,
        ),
        **scale,
    )
    ingress = config.ingress
    return OpenAIIngress.options(
        num_replicas=ingress.num_replicas,
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_ongoing_requests=ingress.max_ongoing_requests,
    ).bind(
        engine_deployment.bind(config.llm_kwargs(num_gpus)),
        config.model,
        config.tokenizer,
        config.api_settings(),
    )


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster (if connected, else this machine) has a GPU."""
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()
