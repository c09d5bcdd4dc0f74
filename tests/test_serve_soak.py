"""CI's 60-second soak of the Serve application (bench/serve_soak.py, run as users run it):
mixed load, client aborts, an overload burst and a killed replica lose no request and leave no
request or KV page behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_a_minute_of_soak_loses_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/serve_soak.py", "--duration", "60", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:]
    assert report["lost"] == 0, report["lost_by_kind"]
    assert report["requests_left"] == 0 and report["pages_left"] == 0
    assert report["completed"] > 0 and report["aborted_by_client"] > 0
    assert report["errors_by_kind"].get("error 503 overloaded", 0) > 0  # the burst's excess
    assert (
        report["sent"] == report["completed"] + report["clean_errors"] + report["aborted_by_client"]
    )
