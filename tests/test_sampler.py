"""Sampler against written-out formulas: kept sets, empirical frequencies, seeds, logprobs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from spin_ray.engine.sampler import Sampler, apply_min_p, apply_top_k_top_p
from spin_ray.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Distinct logits in a scrambled order, so a wrong sort/scatter shows up.
LOGITS = [0.3, -1.0, 2.0, -0.4, 1.2, -2.5, 0.8, 1.5, 0.0, -1.7]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    return [w / sum(weights) for w in weights]


def expected_distribution(logits: list[float], params: SamplingParams) -> list[float]:
    """softmax(logits / T), then top-k, top-p (renormalised after top-k), min-p; renormalised."""
    probs = softmax([x / params.temperature for x in logits])
    order = sorted(range(len(logits)), key=lambda i: -probs[i])
    kept = order[: params.top_k] if params.top_k > 0 else order
    kept_mass = sum(probs[i] for i in kept)
    nucleus, mass = [], 0.0
    for i in kept:
        nucleus.append(i)
        mass += probs[i] / kept_mass
        if mass >= params.top_p:
            break
    final = [i for i in nucleus if probs[i] >= params.min_p * probs[order[0]]]
    final_mass = sum(probs[i] for i in final)
    return [probs[i] / final_mass if i in final else 0.0 for i in range(len(logits))]


def sample_many(sampler, logits, params, generators=None):
    generators = [None] * len(params) if generators is None else generators
    return sampler.sample(logits, params, generators)


CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=2.0),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.6),
    SamplingParams(min_p=0.3),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("device", DEVICES)
def test_frequencies_match_filtered_softmax(device):
    """20k draws per case, all cases interleaved in one batch: each token's frequency is within
    5 standard errors of the formula; tokens the filters drop never appear."""
    draws = 20_000
    params = CASES * draws  # row r uses CASES[r % len(CASES)]
    logits = torch.tensor([LOGITS] * len(params), device=device)  # [B, V]
    sampler = Sampler(torch.Generator(device=device).manual_seed(0))
    tokens = torch.tensor(sample_many(sampler, logits, params).token_ids).view(draws, len(CASES))
    for case, case_params in enumerate(CASES):
        freq = torch.bincount(tokens[:, case], minlength=len(LOGITS)).double() / draws
        for token, p in enumerate(expected_distribution(LOGITS, case_params)):
            if p == 0.0:
                assert freq[token] == 0.0, (case_params, token)
            else:
                tolerance = 5 * math.sqrt(p * (1 - p) / draws)
                assert abs(freq[token] - p) <= tolerance, (case_params, token, freq[token], p)


def test_expected_distribution_formula_is_not_trivial():
    """The cases above really drop tokens and differ from one another."""
    dists = [expected_distribution(LOGITS, p) for p in CASES]
    assert [sum(q == 0 for q in d) for d in dists] == [0, 0, 0, 7, 7, 6, 7]
    assert all(max(abs(a - b) for a, b in zip(dists[0], d, strict=True)) > 0.05 for d in dists[1:])


def kept_by_formula(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    dist = expected_distribution(logits, SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p))
    return {i for i, p in enumerate(dist) if p > 0}


def test_filters_keep_exactly_the_formula_sets():
    """Random rows with their own k, p and min_p: the finite logits are the formula's set.
    top_p is placed midway between two cumulative masses, away from rounding ties."""
    rng = random.Random(0)
    rows, vocab = 64, 50
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    top_k, top_p, min_p, expected = [], [], [], []
    for row in range(rows):
        values = logits[row].tolist()
        k = rng.choice([0, 1, 5, 20, vocab, vocab + 3])
        probs = sorted(softmax(values), reverse=True)[: k or vocab]
        cumulative = [sum(probs[: i + 1]) / sum(probs) for i in range(len(probs))]
        cut = rng.randrange(len(cumulative))
        p = 1.0 if cut == len(cumulative) - 1 else (cumulative[cut] + cumulative[cut + 1]) / 2
        m = rng.choice([0.0, 0.0, 0.05, 0.3, 1.0])
        top_k.append(k), top_p.append(p), min_p.append(m)
        expected.append(kept_by_formula(values, k, p, m))
    filtered = apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    filtered = apply_min_p(filtered, torch.tensor(min_p))
    for row in range(rows):
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        assert kept == expected[row], row
        assert torch.equal(filtered[row][list(kept)], logits[row][list(kept)])
    assert len({len(s) for s in expected}) > 10  # the cases cover many set sizes


def test_filters_none_leave_logits_alone():
    logits = torch.randn(3, 7)
    assert apply_top_k_top_p(logits, None, None) is logits
    assert torch.equal(apply_min_p(logits, torch.zeros(3)), logits)


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    logits = torch.randn(40, 300, generator=torch.Generator().manual_seed(1))
    greedy = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6, top_k=2)]
    params = [greedy[r % 2] if r % 3 else SamplingParams(temperature=1.5) for r in range(40)]
    out = sample_many(Sampler(torch.Generator().manual_seed(0)), logits, params)
    argmax = logits.argmax(dim=-1).tolist()
    greedy_rows = [r for r in range(40) if r % 3]
    assert [out.token_ids[r] for r in greedy_rows] == [argmax[r] for r in greedy_rows]
    sampled_rows = [r for r in range(40) if not r % 3]
    assert any(out.token_ids[r] != argmax[r] for r in sampled_rows)
    all_greedy = sample_many(Sampler(), logits, [greedy[0]] * 40)
    assert all_greedy.token_ids == argmax
    assert sample_many(Sampler(), logits[:0], []).token_ids == []


def seeded_tokens(device, seed, position, companions, steps_logits):
    """Tokens of a request with `seed` placed at `position` among `companions` (params,
    generator) rows, over several steps with fresh companion logits each step."""
    target = SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
    own = torch.Generator(device=device).manual_seed(seed)
    companion_gens = [g for _, g in companions]
    sampler = Sampler(torch.Generator(device=device).manual_seed(123))
    noise = torch.Generator(device=device).manual_seed(position)
    tokens = []
    for step_logits in steps_logits:
        rows = torch.randn(len(companions) + 1, step_logits.shape[-1], generator=noise)
        rows = rows.to(device)
        rows[position] = step_logits
        params = [p for p, _ in companions]
        params.insert(position, target)
        generators = list(companion_gens)
        generators.insert(position, own)
        tokens.append(sampler.sample(rows, params, generators).token_ids[position])
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_gives_same_tokens_whatever_its_batch(device):
    vocab = 1000
    steps = [
        torch.randn(vocab, generator=torch.Generator().manual_seed(s)).to(device) * 0.5
        for s in range(12)
    ]
    other_seeded = torch.Generator(device=device).manual_seed(7)
    alone = seeded_tokens(device, 42, 0, [], steps)
    crowded = seeded_tokens(
        device,
        42,
        3,
        [
            (SamplingParams(), None),
            (SamplingParams(top_k=5, min_p=0.1), None),
            (SamplingParams(temperature=0.0), None),
            (SamplingParams(seed=7, temperature=1.3), other_seeded),
            (SamplingParams(top_p=0.5), None),
        ],
        steps,
    )
    assert alone == crowded
    assert len(set(alone)) > 6  # really sampled, not a constant
    assert seeded_tokens(device, 43, 0, [], steps) != alone


def test_unseeded_rows_follow_the_sampler_generator():
    logits = torch.zeros(64, 50)
    params = [SamplingParams()] * 64
    first = sample_many(Sampler(torch.Generator().manual_seed(5)), logits, params).token_ids
    again = sample_many(Sampler(torch.Generator().manual_seed(5)), logits, params).token_ids
    other = sample_many(Sampler(torch.Generator().manual_seed(6)), logits, params).token_ids
    assert first == again != other


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(logprobs=3, temperature=0.5, top_k=4),
        SamplingParams(),
        SamplingParams(logprobs=0),
        SamplingParams(logprobs=50, temperature=0.0),
        SamplingParams(logprobs=1, top_p=0.3),
    ]
    out = sample_many(Sampler(torch.Generator().manual_seed(0)), logits, params)
    reference = torch.log_softmax(logits.double(), dim=-1)  # [B, V]
    assert out.logprobs[1] is None
    for row in (0, 2, 3, 4):
        entry = out.logprobs[row]
        n = min(params[row].logprobs, 40)
        assert entry.token_id == out.token_ids[row]
        assert entry.logprob == pytest.approx(reference[row, entry.token_id].item(), abs=1e-5)
        top_values, top_ids = reference[row].topk(n)
        assert list(entry.top) == top_ids.tolist()
        assert list(entry.top.values()) == pytest.approx(top_values.tolist(), abs=1e-5)
    none_asked = sample_many(Sampler(), logits, [SamplingParams()] * 5)
    assert none_asked.logprobs is None


def test_sampler_rejects_bad_inputs():
    sampler = Sampler()
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(torch.zeros(2, 5, dtype=torch.float16), [SamplingParams()] * 2, [None] * 2)
    with pytest.raises(ValueError, match="params/generators"):
        sampler.sample(torch.zeros(2, 5), [SamplingParams()], [None])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_stop_and_greedy():
    params = SamplingParams(stop="END", stop_token_ids=[3, 4], temperature=1e-6)
    assert params.stop == ("END",) and params.stop_token_ids == (3, 4) and params.greedy
    assert not SamplingParams(temperature=1e-4).greedy
