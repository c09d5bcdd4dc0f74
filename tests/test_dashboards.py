"""The Grafana dashboard: the committed JSON is the generator's output, it has the variables
and panels operators need, every query names only exported metrics, and `spin-ray dashboards`
writes and uploads it. (Each query is evaluated against a real Prometheus in
test_prometheus.py.)"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from spin_ray.cli import main
from spin_ray.dashboards.build import dashboard_json
from spin_ray.dashboards.panels import ROWS
from spin_ray.metrics import definitions as m

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "dashboards" / "spin-ray.json"


def test_committed_json_is_the_generators_output():
    assert COMMITTED.read_text() == dashboard_json(), (
        "dashboards/spin-ray.json is stale: run `spin-ray dashboards write`"
    )


def test_variables_and_panels():
    board = json.loads(dashboard_json())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["replica"]["includeAll"] and variables["replica"]["multi"]
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    for needed in ("HBM hit rate", "HBM hit rate per replica", "PCIe traffic",
                   "KV pages by tier and state", "Tokens per second", "Time to first token",
                   "Time per output token", "Requests running and waiting", "Preemptions",
                   "Router placements per replica", "HTTP error rate"):  # fmt: skip
        assert needed in titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert all(t["expr"] for t in panel["targets"])


def test_every_query_reads_exported_metrics_only():
    exported = set()
    for spec in m.ALL_METRICS:
        name = "ray_" + spec.name
        exported |= {name} | (
            {name + s for s in ("_bucket", "_sum", "_count")} if spec.kind == "histogram" else set()
        )
    for _, specs in ROWS:
        for spec in specs:
            for query in spec.queries:
                names = set(re.findall(r"\bray_spin_ray_\w+", query.expr))
                assert names and names <= exported, query.expr


def test_write_regenerates_the_file(tmp_path, capsys):
    assert main(["dashboards", "write", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "spin-ray.json").read_text() == dashboard_json()


class _Grafana(BaseHTTPRequestHandler):
    """Grafana's dashboard API, as far as an upload reaches: POST /api/dashboards/db. (No
    Grafana can be installed on these machines; this records what grafana-client sends.)"""

    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Grafana.received.append((self.path, self.headers["Authorization"], body))
        reply = json.dumps({"status": "success", "url": "/d/spin-ray/spin-ray"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_upload_posts_the_dashboard_with_the_key(capsys):
    server = HTTPServer(("127.0.0.1", 0), _Grafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert main(["dashboards", "upload", "--url", url, "--api-key", "k3y"]) == 0
    finally:
        server.shutdown()
    path, auth, body = _Grafana.received[-1]
    assert path == "/api/dashboards/db" and auth == "Bearer k3y"
    assert body["overwrite"] is True and body["dashboard"] == json.loads(dashboard_json())
    assert f"uploaded: {url}/d/spin-ray/spin-ray" in capsys.readouterr().out


def test_upload_to_nothing_is_a_one_line_error(capsys):
    assert main(["dashboards", "upload", "--url", "http://127.0.0.1:9", "--api-key", "k"]) == 2
    assert "cannot reach Grafana at http://127.0.0.1:9" in capsys.readouterr().err
