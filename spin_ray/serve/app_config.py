"""The application's settings, read from the `args:` of deploy/app.yaml (or `spin-ray serve`).

Every section is a frozen dataclass; unknown keys and bad values raise `ValueError` naming the
field, so a typo in the YAML fails the deploy instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spin_ray.serve.openai_api import ApiSettings


def _default_autoscaling() -> dict[str, Any]:
    return {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 300.0,
    }


@dataclass(frozen=True)
class EngineDeploymentConfig:
    """How the `SpinEngine` deployment runs: one engine per replica, one replica per GPU."""

    num_gpus: float | str = "auto"
    """GPUs per replica; "auto": 1 when the cluster has GPUs, else 0 (the engine runs on CPU)."""
    num_cpus: float = 1.0
    """CPUs reserved per replica."""
    num_replicas: int | None = None
    """A fixed replica count; None scales with `autoscaling_config`."""
    autoscaling_config: dict[str, Any] = field(default_factory=_default_autoscaling)
    """Ray Serve autoscaling: min_replicas, max_replicas, target_ongoing_requests,
    upscale_delay_s, downscale_delay_s, ... (ignored when num_replicas is set)."""
    max_ongoing_requests: int = 64
    """Requests one replica runs at once (its engine batches them)."""
    max_queued_requests: int = 512
    """Requests an ingress replica queues for the engines before answering 503; -1: no limit."""
    routing_stats_period_s: float = 1.0
    """How often each replica reports its KV use and load to the routers."""
    stale_after_s: float = 5.0
    """Reports older than this are ignored by the router (least-loaded fallback)."""
    default_output_tokens: int = 1024
    """Output length the router and replicas expect of a request (at most its max_tokens)
    until replicas have seen requests finish; then the 90th percentile of what they saw."""
    max_constructor_retry_count: int = 1
    """Times Ray Serve retries an engine replica whose constructor failed (e.g. a bad model
    path) before the deployment fails; `serve run` then exits with the cause."""

    def __post_init__(self) -> None:
        if self.num_gpus != "auto" and (
            not isinstance(self.num_gpus, int | float) or self.num_gpus < 0
        ):
            raise ValueError(f"num_gpus: must be 'auto' or a number >= 0, got {self.num_gpus!r}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"num_replicas: must be >= 1, got {self.num_replicas}")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ValueError(
                f"max_queued_requests: must be >= 1 or -1, got {self.max_queued_requests}"
            )
        if self.routing_stats_period_s <= 0:
            raise ValueError("routing_stats_period_s: must be > 0")
        if self.stale_after_s <= self.routing_stats_period_s:
            raise ValueError("stale_after_s: must be longer than routing_stats_period_s")
        if self.default_output_tokens < 1:
            raise ValueError(
                f"default_output_tokens: must be >= 1, got {self.default_output_tokens}"
            )
        if self.max_constructor_retry_count < 1:
            raise ValueError(
                f"max_constructor_retry_count: must be >= 1, got {self.max_constructor_retry_count}"
            )

    def resolved_num_gpus(self, cluster_has_gpus: bool) -> float:
        if self.num_gpus == "auto":
            return 1 if cluster_has_gpus else 0
        return self.num_gpus

    def fitted_scale(self, num_gpus: float, free: ClusterResources) -> dict[str, Any]:
        """The deployment's replica count or autoscaling bounds, capped at the replicas the
        cluster's resources hold (`free`: what is left once the ingress is placed), so that
        no replica waits forever for resources the cluster does not have. Raises if not even
        one fits."""
        fits = math.inf
        if num_gpus > 0:
            fits = free.gpus // num_gpus
        if self.num_cpus > 0:
            fits = min(fits, free.cpus // self.num_cpus)
        if fits < 1:
            raise ValueError(
                f"engine: a replica needs {num_gpus} GPU and {self.num_cpus} CPU, and the "
                f"cluster has {free.gpus} GPU and {free.cpus} CPU left beside the ingress"
            )
        if self.num_replicas is not None:
            if self.num_replicas > fits:
                raise ValueError(
                    f"num_replicas: {self.num_replicas} replicas need more than the cluster "
                    f"has ({free.gpus} GPU, {free.cpus} CPU left beside the ingress)"
                )
            return {"num_replicas": self.num_replicas}
        bounds = dict(self.autoscaling_config)
        most = int(min(bounds.get("max_replicas", 1), fits))
        bounds["max_replicas"] = most
        bounds["min_replicas"] = min(bounds.get("min_replicas", 1), most)
        return {"autoscaling_config": bounds}


@dataclass(frozen=True)
class ClusterResources:
    """CPUs and GPUs of the Ray cluster (or this machine)."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class IngressDeploymentConfig:
    """How the OpenAI ingress deployment runs (it tokenizes and streams; no GPU)."""

    num_replicas: int = 1
    """Ingress replicas (each tokenizes and streams; each routes with its own router)."""
    num_cpus: float = 1.0
    """CPUs reserved per ingress replica."""
    max_ongoing_requests: int = 1024
    """HTTP requests one ingress replica handles at once."""

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas: must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")


@dataclass(frozen=True)
class AppConfig:
    """Everything `build_app` needs."""

    model: str = "spin-tiny"
    """Checkpoint folder, .gguf file, hub id, smollm2-135m or spin-tiny."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; defaults to `model`."""
    served_model_name: str | None = None
    """The model id clients use; defaults to `model`."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of `spin_ray.LLM` (device, dtype, max_model_len, cache sizes,
    sparse settings, ...). `device` defaults to cuda on GPU replicas and cpu otherwise."""
    api_key: str | None = None
    """Bearer key required on /v1 requests; None reads $SPIN_RAY_API_KEY (unset: no check)."""
    max_body_bytes: int = 32 * 2**20
    """Largest HTTP request body; larger gets 413."""
    retry_after_s: int = 1
    """Retry-After sent with 503 when overloaded."""
    body_timeout_s: float = 30.0
    """A request body not received whole within this many seconds gets 408."""
    engine: EngineDeploymentConfig = field(default_factory=EngineDeploymentConfig)
    ingress: IngressDeploymentConfig = field(default_factory=IngressDeploymentConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: must name a checkpoint folder, hub id or 'spin-tiny'")
        reserved = {"model", "tokenizer", "progress"} & set(self.engine_args)
        if reserved:
            raise ValueError(f"engine_args: set {sorted(reserved)} at the top level of args")
        if "metrics_port" in self.engine_args:
            raise ValueError(
                "engine_args: metrics_port is for engines outside Ray; under Ray Serve the "
                "metrics go out through Ray's metrics endpoint (docs/observability.md)"
            )
        self.api_settings()  # checks the HTTP fields

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> AppConfig:
        args = dict(args or {})
        _check_keys("args", args, cls)
        if isinstance(args.get("engine"), Mapping):
            _check_keys("engine", args["engine"], EngineDeploymentConfig)
            args["engine"] = EngineDeploymentConfig(**args["engine"])
        if isinstance(args.get("ingress"), Mapping):
            _check_keys("ingress", args["ingress"], IngressDeploymentConfig)
            args["ingress"] = IngressDeploymentConfig(**args["ingress"])
        return cls(**args)

    def api_settings(self) -> ApiSettings:
        return ApiSettings(
            served_model_name=self.served_model_name or self.model,
            api_key=self.api_key,
            max_body_bytes=self.max_body_bytes,
            retry_after_s=self.retry_after_s,
            body_timeout_s=self.body_timeout_s,
        )

    def llm_kwargs(self, num_gpus: float) -> dict[str, Any]:
        """Keyword arguments of `spin_ray.LLM` for one engine replica."""
        from spin_ray.engine.options import options

        known = set(options()) | {"sparse"}
        unknown = set(self.engine_args) - known
        if unknown:
            raise ValueError(
                f"engine_args: unknown keys {sorted(unknown)}; spin_ray.LLM takes the engine "
                f"options {sorted(known)}"
            )
        kwargs = {"model": self.model, "tokenizer": self.tokenizer, **self.engine_args}
        kwargs.setdefault("device", "cuda" if num_gpus > 0 else "cpu")
        kwargs["progress"] = False
        return kwargs


def _check_keys(where: str, values: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
