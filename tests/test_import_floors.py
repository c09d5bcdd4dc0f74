"""The package's floors (pyproject.toml's [tool.importlinter] contracts): engine → attention →
cache → kernels → device, serve/bench/eval/dashboards and the CLI on top, no import upward."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter.configuration import configure
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spin_ray"
configure()  # import-linter's settings (a timer, the graph builder) before checking by hand
CONTRACT_TYPES = {"layers": LayersContract, "forbidden": ForbiddenContract}


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return config["contracts"]


def _check(contract: dict, graph) -> bool:
    options = {k: v for k, v in contract.items() if k not in ("name", "type")}
    options = {
        k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in options.items()
    }
    cls = CONTRACT_TYPES[contract["type"]]
    checker = cls(contract["name"], {"root_packages": ["spin_ray"]}, options)
    return checker.check(graph, verbose=False).kept


@pytest.fixture
def graph():
    return grimp.build_graph("spin_ray", cache_dir=None)


@pytest.mark.parametrize("index", range(len(_contracts())))
def test_contract_kept(graph, index):
    contract = _contracts()[index]
    assert _check(contract, graph), f"broken: {contract['name']} (run `lint-imports` to see why)"


@pytest.mark.parametrize(
    "importer, imported",
    [
        ("spin_ray.cache.stats", "spin_ray.engine.config"),  # the cache reaching up
        ("spin_ray.attention.dense", "spin_ray.sparse.config"),
        ("spin_ray.device.step_buffers", "spin_ray.cache.page_pool"),
        ("spin_ray.engine.llm_engine", "spin_ray.serve.protocol"),
    ],
)
def test_upward_import_breaks_the_floors(graph, importer, imported):
    floors = next(c for c in _contracts() if c["type"] == "layers")
    graph.add_import(importer=importer, imported=imported)
    assert not _check(floors, graph)


def test_serve_reaching_into_the_cache_breaks_its_contract(graph):
    contract = next(c for c in _contracts() if c["type"] == "forbidden")
    graph.add_import(importer="spin_ray.serve.placement", imported="spin_ray.sparse.manager")
    assert not _check(contract, graph)


def test_every_room_is_on_a_floor():
    """A new subpackage or top-level module must be given its floor."""
    floors = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in floors for name in layer.split("|")}
    rooms = {f"spin_ray.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    rooms |= {f"spin_ray.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert rooms - named == set()


def _spin_ray_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] == "spin_ray"}
    return found


def test_kernels_import_only_kernels():
    """spin_ray.kernels (a namespace subpackage, which import-linter's graph does not list)
    sits above the device helpers only: its modules import one another and nothing else of
    spin_ray; the device helpers and the serve layer do not import it."""
    kernels = sorted((PACKAGE / "kernels").glob("*.py"))
    assert kernels
    for path in kernels:
        outside = {m for m in _spin_ray_imports(path) if not m.startswith("spin_ray.kernels.")}
        assert outside == set(), f"{path.name} imports {outside}"
    for folder in ("device", "serve"):
        for path in (PACKAGE / folder).glob("*.py"):
            inside = {m for m in _spin_ray_imports(path) if m.startswith("spin_ray.kernels")}
            assert inside == set(), f"{folder}/{path.name} imports {inside}"
