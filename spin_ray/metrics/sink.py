"""What a metric sink does with a `MetricSpec`: add to a counter, set a gauge, observe into a
histogram. Two sinks implement it: `PrometheusSink` (prometheus-client, outside Ray) and
`RaySink` (Ray's metrics API, inside Ray Serve)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from spin_ray.metrics.definitions import MetricSpec


class MetricSink(Protocol):
    def inc(self, spec: MetricSpec, amount: float, labels: Mapping[str, str]) -> None:
        """Add `amount` (> 0) to a counter."""

    def set(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Set a gauge."""

    def observe(self, spec: MetricSpec, value: float, labels: Mapping[str, str]) -> None:
        """Add one observation to a histogram."""
