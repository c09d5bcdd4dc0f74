"""spin-ray's Grafana dashboard, built with Grafana's grafana-foundation-sdk from the panel
specs of `panels`. `dashboard_json()` is what dashboards/spin-ray.json holds (a test checks the
committed file against it; `spin-ray dashboards write` regenerates it)."""

from __future__ import annotations

import itertools
import json

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
)

from spin_ray.dashboards.panels import ROWS, PanelSpec
from spin_ray.metrics import definitions as m

UID = "spin-ray"
TITLE = "spin-ray: SPIN cache and serving"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
PANEL_WIDTH, PANEL_HEIGHT = 8, 8  # three panels a row (the grid is 24 wide)


def build_dashboard() -> dashboard.Dashboard:
    builder = (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .tags(["spin-ray", "ray-serve", "llm"])
        .description(
            "HBM hit rate, PCIe traffic and KV tiers of the SPIN cache, engine throughput and "
            "latency, and the Ray Serve router and API, from the metrics Ray Serve exports "
            "(docs/observability.md)."
        )
        .refresh("10s")
        .time("now-30m", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dashboard.QueryVariable("replica")
            .label("Engine replica")
            .datasource(DATASOURCE)
            .query(f"label_values({'ray_' + m.REQUESTS_RUNNING.name}, replica)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    ids = itertools.count(1)  # Grafana links and edits panels by id
    for title, specs in ROWS:
        builder = builder.with_row(dashboard.Row(title).id(next(ids)))
        for spec in specs:
            builder = builder.with_panel(_panel(spec).id(next(ids)))
    return builder


def _panel(spec: PanelSpec):
    panel = stat.Panel() if spec.kind == "stat" else timeseries.Panel()
    panel = (
        panel.title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .span(PANEL_WIDTH)
        .height(PANEL_HEIGHT)
    )
    for ref_id, query in zip("ABCDEFGH", spec.queries):
        panel = panel.with_target(
            prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref_id)
        )
    return panel


def dashboard_json() -> str:
    """The dashboard as Grafana's JSON, laid out stably (sorted keys, two-space indent)."""
    built = build_dashboard().build()
    return (
        json.dumps(json.loads(json.dumps(built, cls=JSONEncoder)), indent=2, sort_keys=True) + "\n"
    )
