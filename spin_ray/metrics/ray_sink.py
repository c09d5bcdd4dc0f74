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
        self._started: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        """Counter series that exist (at zero or more)."""

    def inc(self, spec: MetricSpec, amount: float, labels: Mapping[str, str]) -> None:
        series = (spec.name, tuple(sorted(labels.items())))
        if amount > 0:
            self._metric(spec).inc(amount, tags=dict(labels))
        elif series not in self._started:
            # Ray's Counter.inc refuses 0; a counter series should exist from the start (at
            # 0) so that rates and ratios have data before the first event: record the zero
            # through the call inc makes after its check.
            self._metric(spec)._record(0, tags=dict(labels))
        self._started.add(series)

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
