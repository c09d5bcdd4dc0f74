"""`spin-ray train-gate`: a Seer gate distilled from SmolLM2-135M's own attention finds more of
the true top blocks than the untrained gate, scores blocks exactly as the runtime's Seer does,
and the engine runs with it."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from spin_ray import LLM, SamplingParams
from spin_ray.cli import main
from spin_ray.sparse import SeerConfig
from spin_ray.sparse.algorithms import SelectBatch, SparseGeometry, build_algorithm
from spin_ray.sparse.algorithms.seer import default_gates
from spin_ray.sparse.config import SparseConfig
from spin_ray.training import seer_gate
from spin_ray.training.seer_gate import GateTrainingConfig, train_seer_gate

BLOCK = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "gate.safetensors"
    config = GateTrainingConfig(
        tokens=1024, steps=100, block_size=BLOCK, device="cpu", output=str(path)
    )
    return train_seer_gate(config, progress=False)


def test_a_trained_gate_finds_more_of_the_true_top_blocks(trained):
    assert trained.recall_trained > trained.recall_untrained + 0.1, trained
    with safe_open(str(trained.path), "pt") as f:
        assert f.metadata() == {"model": "smollm2-135m", "block_size": str(BLOCK)}
        names = set(f.keys())
        assert names == {f"layers.{i}.{g}" for i in range(30) for g in ("q_gate", "k_gate")}
        assert f.get_tensor("layers.0.q_gate").shape == (3, 64, 64)  # [Hkv, D, D]
        assert f.get_tensor("layers.0.k_gate").shape == (3, 192, 64)  # [Hkv, 3D, D]


def test_the_engine_runs_seer_with_the_trained_gate(trained):
    """The gate's offloaded layers load (layers 2.. of 30); at a budget covering the whole
    context every algorithm attends everything, so the tokens are dense's; at a small budget
    the gate chooses and the request still finishes."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = "The history of Python: " * 60
    common = dict(device="cpu", page_size=16, cpu_kv_tokens=4096, progress=False)
    dense = LLM("smollm2-135m", **common).generate([prompt], params, use_tqdm=False)
    seer = SeerConfig(block_size=BLOCK, gate_path=str(trained.path))
    whole = LLM("smollm2-135m", sparse=seer, token_budget=1.0, cpu_cache_tokens=4096, **common)
    out = whole.generate([prompt], params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == dense[0].outputs[0].token_ids
    small = LLM("smollm2-135m", sparse=seer, token_budget=256, cpu_cache_tokens=4096, **common)
    out = small.generate([prompt], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    assert small.kv_stats().lookups > 0


def test_training_scores_blocks_as_the_runtime_does():
    """The scores the gate is fitted with are Seer's `page_scores` (one block per 2 pages)."""
    page, hkv, hq, d, blocks = 8, 2, 4, 16, 6
    tokens = blocks * 2 * page
    gen = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    q_gate, k_gate = (
        w + 0.1 * torch.randn(w.shape, generator=gen) for w in default_gates(1, hkv, d)
    )
    q_post = torch.randn(1, tokens, hq, d, generator=gen)  # [L, T, Hq, D]
    k_post = torch.randn(1, tokens, hkv, d, generator=gen)
    positions = torch.tensor([tokens - 1])
    inputs = seer_gate._gate_inputs(q_post, k_post, positions, 2 * page, inv_freq)
    trained = seer_gate._scores(q_gate[None, 0], k_gate[None, 0], *inputs)[0, 0]  # [Hkv, nb]

    geometry = SparseGeometry(
        num_layers=1, first_layer=0, num_cpu_pages=2 * blocks, page_size=page,
        num_kv_heads=hkv, num_q_heads=hq, head_dim=d, dtype=torch.float32,
        device=torch.device("cpu"), rope_inv_freq=inv_freq,
    )  # fmt: skip
    seer = build_algorithm(geometry, SparseConfig(algorithm=SeerConfig(block_size=2 * page)))
    seer.q_gate, seer.k_gate = q_gate, k_gate
    pages = torch.arange(2 * blocks)
    slots = torch.arange(tokens)  # page p holds tokens p*S.. (pages are 0..n-1)
    seer.append_chunk(0, slots, k_post[0], k_post[0], 0, torch.arange(tokens))
    count = torch.tensor([2 * blocks])
    batch = SelectBatch(("r",), pages[None].int(), count, count, count * page)
    runtime = seer.page_scores(0, q_post[0, -1:], batch)[0, :, ::2]  # [Hkv, nb]
    # the last block holds the query itself: not scored in training (the runtime's local window
    # attends it)
    torch.testing.assert_close(trained[:, :-1], runtime[:, :-1], rtol=1e-4, atol=1e-4)
    assert torch.isinf(trained[:, -1]).all()


def test_block_mass_is_each_complete_blocks_share_of_attention():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 32, 2, 8, generator=gen)  # [L, T, Hq, D], one KV head
    k = torch.randn(1, 32, 1, 8, generator=gen)
    mass = seer_gate._block_mass(q, k, torch.tensor([20]), block_size=8)[0, 0, 0]  # [nb]
    expected = torch.zeros(4)
    for h in range(2):
        weights = torch.softmax(k[0, :21, 0] @ q[0, 20, h] / math.sqrt(8), 0)
        per_block = torch.stack([weights[8 * j : 8 * j + 8].sum() for j in range(2)])
        expected[:2] += per_block / 2  # blocks 0 and 1 end before token 20
    torch.testing.assert_close(mass, expected / expected.sum())


def test_train_gate_refuses_random_weights(capsys):
    assert main(["train-gate", "--model", "llama-3.1-8b"]) == 2
    assert "random weights" in capsys.readouterr().err
