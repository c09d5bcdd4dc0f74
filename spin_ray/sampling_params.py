"""Per-request sampling settings, in the shape vLLM users know."""

from __future__ import annotations

import math
from dataclasses import dataclass

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this count as 0 (greedy), as in vLLM: dividing by them overflows."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Invalid values raise `ValueError` naming
    the field."""

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """Softmax temperature; 0 (or anything below 1e-5) means greedy."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p; in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p × the top token's; in [0, 1]."""
    seed: int | None = None
    """Seed of this request's own random generator: same seed, same tokens."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the matched string is not included in the text."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (in addition to EOS)."""
    ignore_eos: bool = False
    """Keep generating past the EOS token."""
    logprobs: int | None = None
    """Return the log-probabilities of the sampled token and this many top alternatives."""
    include_stop_str_in_output: bool = False
    """Keep a matched stop string at the end of the text."""
    forced_token_ids: tuple[int, ...] = ()
    """Teacher forcing: the first output tokens are these, whatever the model predicts (with
    `logprobs`, each comes with its raw logprob under the model), then sampling goes on. A
    forced token ends the request as a sampled one would (EOS, stop ids, stop strings)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "forced_token_ids", tuple(self.forced_token_ids))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature: must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: must be -1 (all) or an integer >= 0, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed: must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs: must be an integer >= 0 or None, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: stop strings must be non-empty strings, got {self.stop!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be integers >= 0, got {self.stop_token_ids!r}")
        if any(not _is_int(t) or t < 0 for t in self.forced_token_ids):
            raise ValueError(
                f"forced_token_ids: must be integers >= 0, got {self.forced_token_ids!r}"
            )
        if len(self.forced_token_ids) > self.max_tokens:
            raise ValueError(
                f"forced_token_ids: {len(self.forced_token_ids)} tokens exceed max_tokens "
                f"{self.max_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
