"""What `LLM.generate` returns, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and of the top alternatives at that position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    """The `logprobs` most likely token ids at this position and their log-probabilities."""


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    """"stop" (EOS, stop string or stop token), "length" (max_tokens or max_model_len),
    "abort", or None while still running."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request, if any."""
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request timing, seconds on a monotonic clock."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    num_output_tokens: int
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival → first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (mean decode interval)."""
        if self.finished_time is None or self.first_token_time is None:
            return None
        if self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
