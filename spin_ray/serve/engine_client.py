"""What the HTTP layer needs from an engine: an `EngineRequest` in, `RequestOutput` deltas out.

The ingress tokenizes, so an `EngineRequest` carries token ids; its `demand` is what the KV
working-set router reads to place it (placement.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from spin_ray.outputs import RequestOutput
from spin_ray.sampling_params import SamplingParams
from spin_ray.serve.placement import WorkingSetDemand


@dataclass(frozen=True)
class EngineRequest:
    """A tokenized request, as the ingress hands it to an engine replica."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams

    @property
    def demand(self) -> WorkingSetDemand:
        return WorkingSetDemand(len(self.prompt_token_ids), self.params.max_tokens)


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know of the engines' model."""

    max_model_len: int
    """Longest prompt + output an engine accepts."""


class EngineOverloadedError(RuntimeError):
    """Every engine's queue is full; the client should retry later."""


class EngineDeadError(RuntimeError):
    """An engine's step loop stopped on an error; it takes no more requests (Ray Serve
    restarts its replica)."""


class EngineUnavailableError(RuntimeError):
    """The engine replica serving the request failed (died, or its step loop stopped) after
    it had streamed some of the answer, or no replica could take it up; retry later."""


class EngineClient(Protocol):
    async def model_info(self) -> ModelInfo:
        """The engines' model; raises `EngineUnavailableError` when no engine answers."""
        ...

    async def unavailable_reason(self) -> str | None:
        """None while engines can serve; otherwise why not (e.g. their deployment failed)."""
        ...

    def generate(self, request: EngineRequest) -> AsyncGenerator[RequestOutput, None]:
        """Stream `RequestOutput` deltas. Raises `ValueError` for bad input and
        `EngineOverloadedError` when full, both before the first delta, and
        `EngineUnavailableError` when the engine fails. Closing the iterator early (`aclose`)
        aborts the request."""
        ...
