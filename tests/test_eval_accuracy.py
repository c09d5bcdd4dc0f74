"""Accuracy as a test: SmolLM2-135M (the packaged GGUF, CPU) on two pass-key cases at 4K
tokens (depths 1/4 and 3/4), through `spin-ray eval`'s runner.

- At a budget of 1,024 tokens, a quarter of the context (64 sink and 256 local tokens
  included), every algorithm answers at least as many cases as dense minus MARGIN.
- At full budget (every page), RetroInfer's answers are dense's, token for token (RetroInfer
  is the algorithm that re-lays out pages; the others' full-budget equality is checked on
  spin-tiny in tests/test_sparse_backend.py and tests/test_sparse_engine.py).

MARGIN is one case of the two. Dense must answer both (a 135M model does: the issue measured
4 of 4 at 2K, and bench/RESULTS.md's "Accuracy" section lists this slice's answers); one case
of slack keeps the test about "sparse attention still finds the key at a quarter budget", not
about the exact greedy digits of a 135M model, which a different summation order may flip. It
still fails an algorithm that misses both keys, as a budget of only sink and local tokens does
(0 of 5 tasks at 1K with budget 256 < 64 + 256, bench/RESULTS.md). The slice is this small
because a 4K dense prefill takes ~30-60 s on the 2-core CI machine (the slice: ~2.5 min)."""

from __future__ import annotations

import pytest

from spin_ray.eval.config import EvalConfig, Setting
from spin_ray.eval.runner import run_eval

ALGORITHMS = ("quest", "shadowkv", "retroinfer", "seer")
MARGIN = 1
pytestmark = pytest.mark.usefixtures("smollm2_installed")


@pytest.fixture(scope="module")
def passkey_4k():
    settings = [Setting("dense")]
    settings += [Setting(a, "spin", 1024) for a in ALGORITHMS]
    settings += [Setting("retroinfer", "spin", 1.0)]
    config = EvalConfig(model="smollm2-135m", device="cpu", lengths=(4096,), tasks=("passkey",),
                        samples=2, settings=tuple(settings), scored_tokens=0)  # fmt: skip
    return run_eval(config, progress=False).lengths[0]


def test_dense_answers_the_pass_keys(passkey_4k):
    assert passkey_4k.scores["dense"]["passkey"] == [1.0, 1.0], passkey_4k.answers["dense"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_quarter_budget_answers_within_the_margin_of_dense(passkey_4k, algorithm):
    label = Setting(algorithm, "spin", 1024).label
    dense = sum(passkey_4k.scores["dense"]["passkey"])
    assert sum(passkey_4k.scores[label]["passkey"]) >= dense - MARGIN, passkey_4k.answers[label]


def test_full_budget_answers_are_dense(passkey_4k):
    label = Setting("retroinfer", "spin", 1.0).label
    assert passkey_4k.answers[label] == passkey_4k.answers["dense"]
