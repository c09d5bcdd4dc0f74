"""Metrics: one definition of each (`definitions`), the engine's stats turned into them
(`EngineMetrics`), and two sinks: prometheus-client outside Ray, Ray's metrics API inside Ray
Serve. docs/observability.md lists every metric."""

from spin_ray.metrics.engine_metrics import EngineMetrics, engine_labels

__all__ = ["EngineMetrics", "engine_labels"]
