"""A launched step whose sampled tokens the host has not read yet (async scheduling)."""

from __future__ import annotations

from dataclasses import dataclass

from spin_ray.engine.batch_inputs import DeviceTokens
from spin_ray.engine.request import Request
from spin_ray.engine.sampler import SampledTokens
from spin_ray.engine.stats import StepKind


@dataclass(frozen=True)
class InFlightStep:
    num_tokens: int
    """Tokens the step runs through the model: prompt chunks and decodes."""
    num_prompt_tokens: int
    """Of those, the tokens of prompt chunks (every chunk but a one-token decode)."""
    requests: tuple[Request, ...]
    """The requests it samples a token for, in the rows of `sampled`."""
    sampled: SampledTokens | None
    """Their tokens (None: it samples none, e.g. only a prompt's first chunks)."""

    @property
    def kind(self) -> StepKind:
        return "mixed" if self.num_prompt_tokens else "decode"

    @property
    def live(self) -> bool:
        """It samples nothing (its token count is still to report), or some request of it
        still waits for its token (not finished or aborted since)."""
        return self.sampled is None or any(not r.is_finished for r in self.requests)

    @property
    def device_tokens(self) -> DeviceTokens | None:
        """The sampled ids where the next step's decode rows read them."""
        if self.sampled is None:
            return None
        rows = {request.request_id: row for row, request in enumerate(self.requests)}
        return DeviceTokens(self.sampled.token_ids, rows)
