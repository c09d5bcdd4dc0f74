"""The metrics with prometheus-client, outside Ray (`LLM(metrics_port=...)`, `spin-ray generate
--metrics-port`, `spin-ray bench --metrics-port`), served over HTTP for Prometheus to scrape."""

from __future__ import annotations

from collections.abc import Mapping

import prometheus_client
from prometheus_client import CollectorRegistry

from spin_ray.metrics.definitions import MetricSpec

_METRICS: dict[tuple[int, str], object] = {}
"""(registry id, name) → the prometheus-client metric: one per name and registry, however many
sinks (engines) a process has; their series differ by label values."""


class PrometheusSink:
    def __init__(self, registry: CollectorRegistry = prometheus_client.REGISTRY):
        self.registry = registry

    def inc(self, spec: MetricSpec, amount: float, labels: Mapping[str, str]) -> None:
        self._metric(spec).labels(**labels).inc(amount)

    def set(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        self._metric(spec).labels(**labels).set(value)

    def observe(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        self._metric(spec).labels(**labels).observe(value)

    def _metric(self, spec: MetricSpec):
        key = (id(self.registry), spec.name)
        metric = _METRICS.get(key)
        if metric is None:
            common = dict(labelnames=spec.labels, registry=self.registry)
            if spec.kind == "counter":  # prometheus-client adds the _total back
                metric = prometheus_client.Counter(
                    spec.name.removesuffix("_total"), spec.help, **common
                )
            elif spec.kind == "gauge":
                metric = prometheus_client.Gauge(spec.name, spec.help, **common)
            else:
                metric = prometheus_client.Histogram(
                    spec.name, spec.help, buckets=spec.buckets, **common
                )
            _METRICS[key] = metric
        return metric


_SERVED: set[tuple[str, int]] = set()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve the process's metrics at http://host:port/metrics (a daemon thread), once per
    address however many engines ask; a port taken by another process raises `ValueError`."""
    if not 0 < port < 65536:
        raise ValueError(f"metrics_port: must be in 1..65535, got {port}")
    if (host, port) in _SERVED:
        return
    try:
        prometheus_client.start_http_server(port, addr=host)
    except OSError as err:
        raise ValueError(f"metrics_port: cannot serve metrics on {host}:{port}: {err}") from None
    _SERVED.add((host, port))
