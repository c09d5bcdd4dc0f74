"""`build_app`: the Ray Serve application (`serve run deploy/app.yaml`, `spin-ray serve`).

HTTP ─► OpenAIIngress ──(KV working-set router)──► SpinEngine × N (one per GPU)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from spin_ray.serve.app_config import AppConfig, ClusterResources
from spin_ray.serve.engine_deployment import SpinEngine
from spin_ray.serve.ingress import OpenAIIngress

ROUTER_CLASS = "spin_ray.serve.router:KVWorkingSetRouter"


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The application for `args` (deploy/app.yaml documents every key; {} runs spin-tiny)."""
    config = AppConfig.from_args(args)
    engine, ingress = config.engine, config.ingress
    cluster = cluster_resources()
    num_gpus = engine.resolved_num_gpus(cluster.gpus > 0)
    beside_ingress = ClusterResources(
        cpus=cluster.cpus - ingress.num_replicas * ingress.num_cpus, gpus=cluster.gpus
    )
    engine_deployment = serve.deployment(SpinEngine).options(
        name="SpinEngine",
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": engine.num_cpus},
        max_ongoing_requests=engine.max_ongoing_requests,
        max_queued_requests=engine.max_queued_requests,
        max_constructor_retry_count=engine.max_constructor_retry_count,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={
                "stale_after_s": engine.stale_after_s,
                "default_output_tokens": engine.default_output_tokens,
            },
            request_routing_stats_period_s=engine.routing_stats_period_s,
            request_routing_stats_timeout_s=engine.stale_after_s,
        ),
        **engine.fitted_scale(num_gpus, beside_ingress),
    )
    return OpenAIIngress.options(
        num_replicas=ingress.num_replicas,
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_ongoing_requests=ingress.max_ongoing_requests,
    ).bind(
        engine_deployment.bind(config.llm_kwargs(num_gpus), engine.default_output_tokens),
        config.model,
        config.tokenizer,
        config.api_settings(),
    )


def cluster_resources() -> ClusterResources:
    """CPUs and GPUs of the Ray cluster (if connected, else of this machine)."""
    if ray.is_initialized():
        resources = ray.cluster_resources()
        return ClusterResources(cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0))
    import torch

    return ClusterResources(cpus=os.cpu_count() or 1, gpus=torch.cuda.device_count())
