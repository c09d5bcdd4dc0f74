"""A request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time

import torch

from spin_ray.engine.detokenizer import Detokenizer
from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.outputs import TokenLogprob
from spin_ray.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """Prompt, generated tokens, progress and output state of one request.

    `num_computed_tokens` counts tokens whose KV is stored; the request's next step computes
    tokens from there on. Preemption (recompute) resets it to 0 and keeps the output tokens,
    which are then prefilled again with the prompt.

    With async scheduling a sampled token reaches the host one step late: until then it counts
    in `num_pending_tokens` (and in `num_tokens`, so the next step decodes it, reading its id on
    the device), not in `output_token_ids`.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        detokenizer: Detokenizer,
        prompt: str | None = None,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        """Tokens sampled on the device whose ids the host has not read yet (0 or 1 when the
        scheduler runs; 2 while a step that decodes the pending one is in flight)."""
        self.status = RequestStatus.WAITING
        self.stop_reason: str | int | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.prompt_kv: PromptKV | None = None
        """K/V of the prompt's first tokens computed elsewhere, not stored yet (`PromptKV`)."""
        self.detokenizer = detokenizer
        """Turns the output tokens into text and says when the request stops."""
        self.generator = generator
        """The request's own random generator (`SamplingParams.seed`); None: the engine's."""
        self.logprobs: list[TokenLogprob] = []
        """Log-probabilities of the output tokens, when `SamplingParams.logprobs` asks."""

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the two lists (known
        tokens only: `end` <= `num_known_tokens`)."""
        assert end <= self.num_known_tokens, "a pending token's id is only on the device"
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def num_known_tokens(self) -> int:
        """Prompt and output tokens whose ids are on the host."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens and pending ones."""
        return self.num_known_tokens + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
