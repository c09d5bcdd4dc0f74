"""bench/ as one maintained tree: bench/README.md lists every script there and no other, the
runners run only scripts that exist, and every spin_ray name a script imports exists (the scripts
need a GPU, Ray or minutes to run; their imports are what a refactor breaks first)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.iterdir() if p.suffix in (".py", ".sh"))
LISTED = re.compile(r"^\| `(\w+\.(?:py|sh))`", re.MULTILINE)  # a table row's first cell


def _readme_parts() -> tuple[str, str]:
    """bench/README.md's maintained part and its "Deleted" section."""
    maintained, deleted = (BENCH / "README.md").read_text().split("\n## Deleted\n")
    return maintained, deleted


def test_the_readme_lists_every_script_and_only_those():
    maintained, deleted = _readme_parts()
    on_disk = {p.name for p in SCRIPTS}
    assert set(LISTED.findall(maintained)) == on_disk
    assert not set(LISTED.findall(deleted)) & on_disk


def test_the_runners_run_only_scripts_that_exist():
    for runner in BENCH.glob("*.sh"):
        named = set(re.findall(r"bench/(\w+\.py)", runner.read_text()))
        assert named <= {p.name for p in SCRIPTS}, runner.name


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.suffix == ".py"], ids=lambda p: p.name)
def test_every_spin_ray_name_a_script_imports_exists(script):
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spin_ray"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"
                ), f"{script.name}: from {node.module} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("spin_ray"):
                    importlib.import_module(alias.name)
