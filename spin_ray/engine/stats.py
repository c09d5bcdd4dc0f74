"""What one engine call produced, for metric sinks (vLLM v1's pattern: the engine hands plain
frozen stats to the loggers it was given; it never knows a metric's name or a sink).

`LLMEngine.step` (and `abort_request`) build one `EngineStats` and give it to each
`StatLogger`; `spin_ray.metrics.EngineMetrics` turns it into Prometheus or Ray metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from spin_ray.cache.stats import KVStats
from spin_ray.engine.request import Request

StepKind = Literal["decode", "mixed"]
"""A step that only decodes, or one with a prompt chunk (prefill, alone or beside decodes)."""


@dataclass(frozen=True)
class FinishedRequest:
    """A request that ended in this call."""

    finish_reason: str
    """"stop", "length" or "abort"."""
    prompt_tokens: int
    generation_tokens: int
    e2e_latency_s: float
    """Arrival to finish."""
    time_per_output_token_s: float | None
    """First token to finish over the tokens after the first; None with fewer than two."""


@dataclass(frozen=True)
class EngineStats:
    """One `step()` call's figures (or an abort's, outside a step)."""

    step_kind: StepKind | None = None
    """Kind of the step whose tokens this call read; None when it read none."""
    step_seconds: float | None = None
    """Wall time of the call (with async scheduling: waiting for the step it reads)."""
    prompt_tokens: int = 0
    """Prompt tokens the step read ran through the model (recomputed ones included)."""
    generation_tokens: int = 0
    """Tokens appended to requests."""
    num_preemptions: int = 0
    """Requests preempted by this call's schedule."""
    time_to_first_token_s: tuple[float, ...] = ()
    """Arrival to first token, of each request that got its first token."""
    inter_token_latency_s: tuple[float, ...] = ()
    """Gap since the request's previous token, of each later token."""
    finished: tuple[FinishedRequest, ...] = ()
    num_running: int = 0
    num_waiting: int = 0
    kv: KVStats | None = None
    """A cache snapshot, at most every `EngineConfig.kv_stats_interval_s` (reading the
    device's counters waits for the GPU), and on the call that leaves the engine idle."""


class StatLogger(Protocol):
    """Takes each call's `EngineStats` (in the engine's thread; keep it cheap)."""

    def record(self, stats: EngineStats) -> None: ...


class StatsTally:
    """What the engine notes while one call runs, turned into `EngineStats` at its end."""

    def __init__(self) -> None:
        self.time_to_first_token_s: list[float] = []
        self.inter_token_latency_s: list[float] = []
        self.finished: list[FinishedRequest] = []

    def token(self, request: Request, now: float) -> None:
        """A token reaches `request` at `now` (before its token times are updated)."""
        if request.first_token_time is None:
            self.time_to_first_token_s.append(now - request.arrival_time)
        else:
            self.inter_token_latency_s.append(now - request.last_token_time)

    def finish(self, request: Request, now: float) -> None:
        """`request` ended at `now`."""
        n = len(request.output_token_ids)
        first = request.first_token_time
        self.finished.append(
            FinishedRequest(
                finish_reason=request.finish_reason,
                prompt_tokens=len(request.prompt_token_ids),
                generation_tokens=n,
                e2e_latency_s=now - request.arrival_time,
                time_per_output_token_s=(
                    (request.last_token_time - first) / (n - 1) if n > 1 else None
                ),
            )
        )

    def build(self, **fields) -> EngineStats:
        """The call's `EngineStats`; `fields` are the rest of its figures."""
        return EngineStats(
            time_to_first_token_s=tuple(self.time_to_first_token_s),
            inter_token_latency_s=tuple(self.inter_token_latency_s),
            finished=tuple(self.finished),
            **fields,
        )
