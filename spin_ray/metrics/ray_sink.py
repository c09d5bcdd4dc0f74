"""The metrics with Ray's metrics API, inside Ray Serve replicas (engines, ingress, router).

`ray.serve.metrics` wraps `ray.util.metrics` and adds each replica's deployment, replica and
application labels, so Ray's metrics endpoint on every node (and its Prometheus
service-discovery file) carries them; Ray prefixes every name with `ray_`."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from spin_ray.metrics.definitions import MetricSpec

GAUGE_REFRESH_S = 1.0
"""Ray's metrics agent drops a gauge value not set again within two export intervals (Ray
2.60: 2 × max(metrics_report_interval_ms, 1 s)), so an idle engine's gauges (0 running, its KV
pages) would vanish from Prometheus; the sink sets every gauge again this often."""


class RaySink:
    def __init__(self) -> None:
        self._metrics: dict[str, object] = {}
        self._started: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        """Counter series that exist (at zero or more)."""
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[object, float, dict]] = {}
        """Each gauge series' last value, set again every `GAUGE_REFRESH_S`."""
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

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
        metric, tags = self._metric(spec), dict(labels)
        metric.set(value, tags=tags)
        with self._lock:
            self._gauges[(spec.name, tuple(sorted(tags.items())))] = (metric, value, tags)
            if self._refresher is None:
                self._refresher = threading.Thread(
                    target=self._refresh_gauges, name="spin-ray-gauges", daemon=True
                )
                self._refresher.start()

    def observe(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        self._metric(spec).observe(value, tags=dict(labels))

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._lock:
                gauges = list(self._gauges.values())
            for metric, value, tags in gauges:
                metric.set(value, tags=tags)

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
