"""Benchmark workloads: stated length statistics, seeding, prompt ids, Poisson arrivals."""

import math

import numpy as np
import pytest

from spin_ray.bench.workloads import (
    K,
    LengthDistribution,
    WorkloadSpec,
    arrival_times,
    build_requests,
    sample_lengths,
)

# (workload, (input low, high, mean), (output low, high, mean)); None: no mean stated.
STATED = [
    ("longbench-v2", (32 * K, 120 * K, 55 * K), (500, 15 * K, 5 * K)),
    ("longgenbench", (16 * K, 19 * K, None), (7 * K, 32 * K, None)),
]


def _check_stats(lengths, low, high, mean):
    span = high - low
    assert lengths.min() >= low and lengths.max() <= high
    # the sample covers the range, not a corner of it
    assert lengths.min() < low + 0.02 * span and lengths.max() > high - 0.1 * span
    if mean is not None:
        assert lengths.mean() == pytest.approx(mean, rel=0.01)


@pytest.mark.parametrize("name,inputs,outputs", STATED)
def test_named_workloads_hit_stated_ranges_and_means(name, inputs, outputs):
    input_lens, output_lens = sample_lengths(WorkloadSpec(name=name, num_prompts=20000, seed=7))
    _check_stats(input_lens, *inputs)
    _check_stats(output_lens, *outputs)


def test_scale_shrinks_lengths_proportionally():
    full = sample_lengths(WorkloadSpec(name="longbench-v2", num_prompts=5000, seed=1))
    tenth = sample_lengths(WorkloadSpec(name="longbench-v2", num_prompts=5000, seed=1, scale=0.1))
    for a, b in zip(full, tenth, strict=True):
        assert np.all(np.abs(b - 0.1 * a) <= 1.0)
    assert tenth[0].min() >= 3276 and tenth[0].max() <= 12288


def test_output_len_overrides_sampled_outputs():
    input_lens, output_lens = sample_lengths(
        WorkloadSpec(name="longgenbench", num_prompts=50, output_len=9, scale=0.01)
    )
    assert set(output_lens.tolist()) == {9}
    assert input_lens.min() >= 163 and input_lens.max() <= 195


def test_seeded_and_seed_sensitive():
    a = sample_lengths(WorkloadSpec(name="longbench-v2", num_prompts=100, seed=3))
    b = sample_lengths(WorkloadSpec(name="longbench-v2", num_prompts=100, seed=3))
    c = sample_lengths(WorkloadSpec(name="longbench-v2", num_prompts=100, seed=4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_prompts_avoid_special_ids_and_have_requested_lengths():
    spec = WorkloadSpec(name="fixed", num_prompts=4, input_len=500, output_len=3, seed=2)
    requests = build_requests(spec, vocab_size=10, special_token_ids=[0, 2, 9])
    assert [len(r.prompt_token_ids) for r in requests] == [500] * 4
    assert [r.output_len for r in requests] == [3] * 4
    seen = {t for r in requests for t in r.prompt_token_ids}
    assert seen == {1, 3, 4, 5, 6, 7, 8}
    assert len({r.request_id for r in requests}) == 4
    again = build_requests(spec, vocab_size=10, special_token_ids=[0, 2, 9])
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in requests]


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_inter_arrival_mean_is_inverse_rate(rate):
    arrivals = arrival_times(20000, rate, seed=5)
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)
    # exponential gaps: standard deviation equals the mean
    assert gaps.std() == pytest.approx(1.0 / rate, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_gaps_keep_the_rate_and_spread_by_burstiness(burstiness):
    """Gamma(b, 1 / (rate b)) gaps: mean 1 / rate for any b, coefficient of variation
    1 / sqrt(b) (burstier below 1, more even above)."""
    rate = 2.0
    gaps = np.diff(arrival_times(40000, rate, seed=3, burstiness=burstiness))
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0 / math.sqrt(burstiness), rel=0.05)


def test_burstiness_one_is_the_poisson_stream():
    rng = np.random.default_rng([7, 2])
    expected = np.concatenate([[0.0], np.cumsum(rng.exponential(1 / 3.0, size=9))])
    assert np.array_equal(arrival_times(10, 3.0, seed=7, burstiness=1.0), expected)


def test_infinite_rate_is_offline():
    assert np.array_equal(arrival_times(5, math.inf), np.zeros(5))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(name="sharegpt"), "workload"),
        (dict(name="fixed", input_len=None, output_len=4), "input_len"),
        (dict(name="longbench-v2", input_len=10), "input_len"),
        (dict(name="longbench-v2", scale=0.0), "scale"),
        (dict(name="fixed", input_len=4, output_len=4, num_prompts=0), "num_prompts"),
        (dict(name="fixed", input_len=4, output_len=0), "output_len"),
    ],
)
def test_bad_workload_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WorkloadSpec(**kwargs)


def test_bad_rate_and_distribution_name_the_field():
    with pytest.raises(ValueError, match="request_rate"):
        arrival_times(3, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(3, 1.0, burstiness=0.0)
    with pytest.raises(ValueError, match="mean"):
        LengthDistribution(10, 20, 25)
