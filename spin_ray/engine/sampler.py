"""Next-token sampling: one step's logits → token ids (and optional logprobs), one row per request.

Each row follows its own `SamplingParams`. Greedy rows (temperature 0) take the argmax of the raw
logits. The other rows go through, in this order: temperature, top-k, top-p, min-p, then a
draw from the renormalised distribution. The settings are gathered into tensors once per step
(`SamplingBatch`), so every filter is one vectorised pass over the batch, and a filter no row
uses costs nothing.

The draw is an exponential race: argmax_i(p_i / q_i) with q_i ~ Exp(1) is distributed as p.
A request with its own (seeded) generator draws the q of its row from that generator alone,
exactly V values a step, so its tokens depend on its seed and its logits only, not on the
other requests of the batch. Rows sharing a generator (the engine's, for unseeded requests)
draw their noise together in one call.

Logprobs are those of the raw model distribution, log_softmax(logits), before temperature and
filters (vLLM's default, "raw_logprobs").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spin_ray.device.step_buffers import stream_mark, to_device_async, to_host_async
from spin_ray.outputs import TokenLogprob
from spin_ray.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingBatch:
    """One step's sampling settings as tensors, one row per request. A field is None when no
    row needs that operation."""

    greedy: torch.Tensor | None
    """[B] bool, rows that take the argmax; None when no row is greedy."""
    all_greedy: bool
    """Every row is greedy: nothing is drawn."""
    temperature: torch.Tensor | None
    """[B] float32 divisor of the logits (1.0 on greedy rows); None when all are 1."""
    top_k: torch.Tensor | None
    """[B] int64 tokens kept, 0 = all; None when no sampling row filters by top-k."""
    top_p: torch.Tensor | None
    """[B] float32 in (0, 1]; None when no sampling row filters by top-p."""
    min_p: torch.Tensor | None
    """[B] float32 in [0, 1]; None when no sampling row filters by min-p."""
    num_logprobs: tuple[int | None, ...]
    """Per row, how many top alternatives to return with the sampled token's logprob; None:
    no logprobs for that row."""

    def __post_init__(self) -> None:
        rows = len(self.num_logprobs)
        for name in ("greedy", "temperature", "top_k", "top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (rows,):
                raise ValueError(f"{name}: expected shape ({rows},), got {tuple(value.shape)}")

    @property
    def max_num_logprobs(self) -> int | None:
        """The most alternatives any row asks for; None when no row asks for logprobs."""
        asked = [n for n in self.num_logprobs if n is not None]
        return max(asked) if asked else None

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str
    ) -> SamplingBatch:
        """Gather the rows' settings; a greedy row gets neutral filter values."""
        greedy = [p.greedy for p in params]
        sampling = [p for p in params if not p.greedy]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device_async(torch.tensor(values, dtype=dtype), device)

        def neutral_unless_sampling(field: str, neutral: float) -> list:
            return [neutral if p.greedy else getattr(p, field) for p in params]

        return cls(
            greedy=column(greedy, torch.bool) if any(greedy) else None,
            all_greedy=not sampling,
            temperature=(
                column(neutral_unless_sampling("temperature", 1.0), torch.float32)
                if any(p.temperature != 1.0 for p in sampling)
                else None
            ),
            top_k=(
                column([0 if p.greedy else max(p.top_k, 0) for p in params], torch.int64)
                if any(p.top_k > 0 for p in sampling)
                else None
            ),
            top_p=(
                column(neutral_unless_sampling("top_p", 1.0), torch.float32)
                if any(p.top_p < 1.0 for p in sampling)
                else None
            ),
            min_p=(
                column(neutral_unless_sampling("min_p", 0.0), torch.float32)
                if any(p.min_p > 0.0 for p in sampling)
                else None
            ),
            num_logprobs=tuple(p.logprobs for p in params),
        )


@dataclass(frozen=True)
class SamplerOutput:
    """One step's sampled tokens, on the host."""

    token_ids: list[int]
    """[B] the sampled token of each row."""
    logprobs: list[TokenLogprob | None] | None
    """[B] per row, its sampled token's raw logprob and its top alternatives (None for rows
    that did not ask); None when no row asked."""


class SampledTokens:
    """One step's sampled tokens on the device, already on their way to the host: `result()`
    waits for them there. The engine reads a step's tokens only after launching the next step
    (async scheduling), which decodes them from `token_ids` on the device meanwhile."""

    def __init__(
        self,
        token_ids: torch.Tensor,  # [B] int64 on the logits' device
        logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        num_logprobs: tuple[int | None, ...],
    ):
        self.token_ids = token_ids
        """[B] int64, on the device: what the next step's decode rows read."""
        self._num_logprobs = num_logprobs
        # sampled token's logprob [B], top logprobs [B, N], top ids [B, N]: copies to the host
        # started now (into pinned memory on CUDA), read once `_ready` has passed
        tensors = (token_ids, *(logprobs or ()))
        self._host = tuple(to_host_async(t) for t in tensors)
        self._ready = stream_mark(token_ids)

    def result(self) -> SamplerOutput:
        """The tokens (and logprobs) on the host; waits for the step that sampled them."""
        if self._ready is not None:
            self._ready.synchronize()
        token_ids = self._host[0].tolist()
        if len(self._host) == 1:
            return SamplerOutput(token_ids=token_ids, logprobs=None)
        sampled, top_logprobs, top_ids = (t.tolist() for t in self._host[1:])
        logprobs: list[TokenLogprob | None] = []
        for row, (token_id, n) in enumerate(zip(token_ids, self._num_logprobs, strict=True)):
            if n is None:
                logprobs.append(None)
                continue
            top = dict(zip(top_ids[row][:n], top_logprobs[row][:n], strict=True))
            logprobs.append(TokenLogprob(token_id=token_id, logprob=sampled[row], top=top))
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Set to -inf the logits each row's top-k and top-p filters drop; returns a new tensor.

    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are all
    kept; k = 0 keeps all). top-p then keeps the smallest set of most likely tokens whose
    probability (renormalised after top-k) reaches top_p; the top token always stays.
    """
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # [B, V] ascending, [B, V] token ids
    if top_k is not None:
        kept = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # [B]
        kth_largest = sorted_logits.gather(-1, (vocab - kept)[:, None])  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        # mass of each token and all less likely ones; a token goes when the more likely
        # tokens alone already reach top_p.
        mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        drop = mass_up_to <= (1.0 - top_p)[:, None]  # [B, V]
        drop[:, -1] = False  # the top token stays even if the cumsum rounds below 1 - top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits of tokens whose probability is below min_p × the top token's,
    i.e. logit < max logit + log(min_p); returns a new tensor. The ratio to the top token does
    not change under renormalisation, so this may follow top-k/top-p (which keep the top
    token)."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]  # [B, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


class Sampler:
    """Samples one token per row; `generator` draws for rows that bring no generator of their
    own (None: torch's default generator)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SamplerOutput:
        """Sample a token for each row of `logits` [B, V] float32; `generators[i]` is row i's
        generator (a request's own, seeded one, or None / a shared one). Waits for the tokens."""
        return self.sample_async(logits, params, generators).result()

    def sample_async(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        forced: Sequence[int] | None = None,
    ) -> SampledTokens:
        """`sample` without waiting: the tokens stay on the device, their host copy started.
        Nothing here waits for the GPU (the settings go over from pinned memory). `forced`
        [B]: a token each row takes instead of a sampled one (teacher forcing; -1: sample)."""
        if logits.dim() != 2 or logits.dtype != torch.float32:
            raise ValueError(
                f"logits: expected [B, V] float32, got {tuple(logits.shape)} {logits.dtype}"
            )
        if not len(params) == len(generators) == logits.shape[0]:
            raise ValueError(
                f"params/generators: expected {logits.shape[0]} rows each, "
                f"got {len(params)} and {len(generators)}"
            )
        for g in (*generators, self.generator):
            if g is not None and g.device.type != logits.device.type:
                raise ValueError(
                    f"generators: a generator on {g.device} cannot sample logits on {logits.device}"
                )
        batch = SamplingBatch.from_params(params, logits.device)
        token_ids = self.sample_tensor(logits, batch, generators)  # [B]
        if forced is not None and any(t >= 0 for t in forced):
            forced_ids = to_device_async(torch.tensor(forced, dtype=torch.int64), logits.device)
            token_ids = torch.where(forced_ids >= 0, forced_ids, token_ids)  # [B]
        return SampledTokens(
            token_ids, token_logprob_tensors(logits, token_ids, batch), batch.num_logprobs
        )

    def sample_tensor(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """The sampled token ids [B] int64, left on the logits' device."""
        if batch.all_greedy:
            return logits.argmax(dim=-1)  # [B]
        greedy_ids = logits.argmax(dim=-1) if batch.greedy is not None else None  # [B]
        scaled = logits if batch.temperature is None else logits / batch.temperature[:, None]
        filtered = apply_top_k_top_p(scaled, batch.top_k, batch.top_p)  # [B, V]
        if batch.min_p is not None:
            filtered = apply_min_p(filtered, batch.min_p)
        probs = filtered.softmax(dim=-1)  # [B, V]
        noise = self._exponential_noise(probs, generators)  # [B, V]
        sampled = probs.div_(noise).argmax(dim=-1)  # [B]
        return sampled if greedy_ids is None else torch.where(batch.greedy, greedy_ids, sampled)

    def _exponential_noise(
        self, like: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """Exp(1) noise shaped like `like` [B, V]: a row with its own generator draws exactly its
        own V values from it; rows sharing a generator draw together."""
        noise = torch.empty_like(like)  # [B, V]
        rows_by_generator: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for row, g in enumerate(generators):
            g = self.generator if g is None else g
            rows_by_generator.setdefault(id(g), (g, []))[1].append(row)
        for g, rows in rows_by_generator.values():
            if len(rows) == noise.shape[0]:
                noise.exponential_(generator=g)
            elif len(rows) == 1:
                noise[rows[0]].exponential_(generator=g)
            else:  # the row indices go over without waiting for the GPU
                index = to_device_async(torch.tensor(rows), noise.device)  # [r]
                noise[index] = noise.new_empty(len(rows), noise.shape[1]).exponential_(generator=g)
        # exponential_ may return exactly 0: a dropped token's 0/0 would be NaN, which argmax picks.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def token_logprob_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """On the logits' device: each row's sampled token's raw logprob, log_softmax(logits),
    [B], and the `max_num_logprobs` most likely tokens' logprobs and ids, [B, N] each; None
    when no row asks for logprobs (`SampledTokens.result` keeps each row's own count)."""
    max_n = batch.max_num_logprobs
    if max_n is None:
        return None
    raw = logits.log_softmax(dim=-1)  # [B, V]
    sampled = raw.gather(-1, token_ids[:, None]).squeeze(-1)  # [B]
    top_logprobs, top_ids = raw.topk(min(max_n, logits.shape[-1]), dim=-1)  # [B, N], [B, N]
    return sampled, top_logprobs, top_ids
