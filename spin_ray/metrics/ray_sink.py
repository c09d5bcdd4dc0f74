"""The metrics with Ray's metrics API, inside Ray Serve replicas (engines, ingress, router).

`ray.serve.metrics` wraps `ray.util.metrics` and adds each replica's deployment, replica and
application labels, so Ray's metrics endpoint on every node (and its Prometheus
service-discovery file) carries them; Ray prefixes every name with `ray_`."""

from __future__ import annotations

from collections.abc import Mapping

from spin_ray.metrics.definitions import MetricSpec


class RaySink:
    def __init__(self) -> None:
        self._metrics: dict[str, object] = {}

    def inc(self, spec: MetricSpec, amount: float, labels: Mapping[str, str]) -> None:
        if amount > 0:  # Ray refuses non-positive increments
            self._metric(spec).inc(amount, tags=dict(labels))

    def set(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        self._metric(spec).set(value, tags=dict(labels))

    def observe(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        self._metric(spec).observe(value, tags=dict(labels))

    def _metric(self, spec: MetricSpec):
        metric = self._metrics.get(spec.name)
        if metric is None:
            from ray.serve import metrics

            if spec.kind == "counter":
                metric = metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                metric = metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
            else:
                metric = metrics.Histogram(
                    spec.name, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels
                )
            self._metrics[spec.name] = metric
        return metric
