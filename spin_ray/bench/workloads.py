"""Seeded benchmark workloads: request lengths, random prompt token ids, Poisson (or burstier /
smoother Gamma) arrivals.

Named workloads follow the length statistics SPIN reports for its benchmarks (K = 1024 tokens):
- `longbench-v2`: input 32K–120K, mean 55K; output 500–15K, mean 5K.
- `longgenbench`: input 16K–19K; output 7K–32K (no mean stated: uniform over the range).
Each length is a scaled Beta variable on [low, high], which hits both the range and the mean
exactly (a clipped lognormal would shift its mean); `scale` shrinks every length to fit a
short run. `fixed` gives every request the same input and output length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

K = 1024

WORKLOAD_NAMES = ("fixed", "longbench-v2", "longgenbench")


@dataclass(frozen=True)
class LengthDistribution:
    """Lengths `low + (high - low) * Beta(a, b)` with the Beta's mean placed at `mean`."""

    low: int
    """Shortest length (tokens, before scaling)."""
    high: int
    """Longest length (tokens, before scaling)."""
    mean: float
    """Mean length (tokens, before scaling); strictly between low and high."""
    concentration: float = 2.0
    """a + b of the Beta; smaller spreads lengths toward the ends of the range."""

    def __post_init__(self) -> None:
        if not 1 <= self.low < self.high:
            raise ValueError(f"low: need 1 <= low < high, got low={self.low}, high={self.high}")
        if not self.low < self.mean < self.high:
            raise ValueError(f"mean: must lie strictly inside [{self.low}, {self.high}]")
        if self.concentration <= 0:
            raise ValueError(f"concentration: must be > 0, got {self.concentration}")

    def sample(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        """`n` lengths (int64), each multiplied by `scale` and rounded, at least 1."""
        fraction = (self.mean - self.low) / (self.high - self.low)
        beta = rng.beta(
            fraction * self.concentration, (1.0 - fraction) * self.concentration, size=n
        )  # [n] in [0, 1]
        lengths = self.low + (self.high - self.low) * beta
        return np.maximum(np.rint(lengths * scale), 1).astype(np.int64)


LONGBENCH_V2_INPUT = LengthDistribution(32 * K, 120 * K, 55 * K, concentration=4.0)
LONGBENCH_V2_OUTPUT = LengthDistribution(500, 15 * K, 5 * K, concentration=3.0)
LONGGENBENCH_INPUT = LengthDistribution(16 * K, 19 * K, 17.5 * K, concentration=2.0)
LONGGENBENCH_OUTPUT = LengthDistribution(7 * K, 32 * K, 19.5 * K, concentration=2.0)

NAMED_WORKLOAD_LENGTHS = {  # name -> (input lengths, output lengths)
    "longbench-v2": (LONGBENCH_V2_INPUT, LONGBENCH_V2_OUTPUT),
    "longgenbench": (LONGGENBENCH_INPUT, LONGGENBENCH_OUTPUT),
}


@dataclass(frozen=True)
class WorkloadSpec:
    """Which requests a benchmark sends (their arrival times are chosen per request rate)."""

    name: str = "fixed"
    """`fixed` (every request `input_len` in, `output_len` out), `longbench-v2` or
    `longgenbench`."""
    num_prompts: int = 8
    """Requests in the workload."""
    input_len: int | None = None
    """Prompt tokens per request; required for `fixed`, not allowed for named workloads."""
    output_len: int | None = None
    """Output tokens per request; required for `fixed`; for named workloads it replaces the
    sampled output lengths when given."""
    scale: float = 1.0
    """Multiplies every sampled length of a named workload (0 < scale <= 1 shrinks them)."""
    seed: int = 0
    """Seed of lengths, prompt tokens and arrivals."""

    def __post_init__(self) -> None:
        if self.name not in WORKLOAD_NAMES:
            raise ValueError(f"workload: unknown workload {self.name!r}; use {WORKLOAD_NAMES}")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1, got {self.num_prompts}")
        if self.name == "fixed":
            if self.input_len is None or self.output_len is None:
                raise ValueError("input_len: the fixed workload needs input_len and output_len")
            if self.scale != 1.0:
                raise ValueError("scale: only named workloads are scaled")
        elif self.input_len is not None:
            raise ValueError(f"input_len: the {self.name} workload samples its own input lengths")
        if self.input_len is not None and self.input_len < 1:
            raise ValueError(f"input_len: must be >= 1, got {self.input_len}")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError(f"output_len: must be >= 1, got {self.output_len}")
        if not self.scale > 0:
            raise ValueError(f"scale: must be > 0, got {self.scale}")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    request_id: str
    prompt_token_ids: list[int]
    output_len: int
    """Tokens to generate (EOS ignored)."""


def sample_lengths(spec: WorkloadSpec) -> tuple[np.ndarray, np.ndarray]:
    """Input and output lengths ([num_prompts] int64 each) of the workload."""
    n = spec.num_prompts
    if spec.name == "fixed":
        return np.full(n, spec.input_len, np.int64), np.full(n, spec.output_len, np.int64)
    input_dist, output_dist = NAMED_WORKLOAD_LENGTHS[spec.name]
    rng = np.random.default_rng([spec.seed, 0])
    input_lens = input_dist.sample(rng, n, spec.scale)
    if spec.output_len is not None:
        return input_lens, np.full(n, spec.output_len, np.int64)
    return input_lens, output_dist.sample(rng, n, spec.scale)


def build_requests(
    spec: WorkloadSpec, vocab_size: int, special_token_ids: list[int]
) -> list[BenchRequest]:
    """The workload's requests, prompts drawn uniformly from the vocabulary minus special ids."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_token_ids, np.int64))
    if allowed.size == 0:
        raise ValueError("vocab_size: no ordinary token ids to draw prompts from")
    input_lens, output_lens = sample_lengths(spec)
    rng = np.random.default_rng([spec.seed, 1])
    return [
        BenchRequest(
            request_id=f"bench-{i}",
            prompt_token_ids=rng.choice(allowed, size=int(input_len)).tolist(),
            output_len=int(output_len),
        )
        for i, (input_len, output_len) in enumerate(zip(input_lens, output_lens, strict=True))
    ]


def arrival_times(
    num_requests: int, request_rate: float, seed: int = 0, burstiness: float = 1.0
) -> np.ndarray:
    """Arrival offsets in seconds ([num_requests], float64, first at 0) at `request_rate`
    requests/s on average, or all at 0 (offline) when the rate is infinite. The gaps are
    Gamma(burstiness, 1 / (rate * burstiness)) as in `vllm bench serve`: burstiness 1 is a
    Poisson process (exponential gaps), below 1 burstier, above 1 more even."""
    if num_requests < 1:
        raise ValueError(f"num_requests: must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate: must be > 0 or inf, got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness: must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng([seed, 2])
    if burstiness == 1.0:  # the exponential draws (the same stream as before burstiness)
        gaps = rng.exponential(1.0 / request_rate, size=num_requests - 1)  # [n - 1]
    else:
        gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=num_requests - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
