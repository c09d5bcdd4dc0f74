"""An engine deployment that cannot start (here: a model path that does not exist) fails fast
and says why: `spin-ray serve` exits with the cause, and under `serve run` (Ray's command keeps
running with a config file whatever happens) /health answers 503 with the cause instead of
hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

BAD_MODEL = "/no/such/model"
CAUSE = f"model: '{BAD_MODEL}' is not an existing folder"


@pytest.mark.ray
def test_spin_ray_serve_exits_with_the_cause(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "spin_ray.cli", "serve", "--model", BAD_MODEL, "--port", "8012"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert CAUSE in done.stderr.splitlines()[-1]
    assert time.monotonic() - started < 240


@pytest.mark.ray
def test_serve_run_answers_health_with_the_cause(tmp_path):
    config = tmp_path / "app.yaml"
    config.write_text(
        "http_options: {host: 127.0.0.1, port: 8011}\n"
        "applications:\n  - name: spin-ray\n    route_prefix: /\n"
        "    import_path: spin_ray.serve:build_app\n"
        f"    args: {{model: {BAD_MODEL}}}\n"
    )
    serve_cli = Path(sys.executable).with_name("serve")
    process = subprocess.Popen(
        [str(serve_cli), "run", str(config)], cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "no answer naming the cause"
            try:
                response = httpx.get("http://127.0.0.1:8011/health", timeout=10)
            except httpx.HTTPError:
                time.sleep(2)
                continue
            if response.status_code == 503 and CAUSE in response.text:
                break
            time.sleep(2)
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable" and response.headers["Retry-After"]
        started = time.monotonic()
        models = httpx.get("http://127.0.0.1:8011/v1/models", timeout=30)
        assert models.status_code == 503 and time.monotonic() - started < 15
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
