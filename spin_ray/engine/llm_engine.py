"""The engine: schedule → execute → update, one call of `step()` at a time."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping

import numpy as np
import torch

from spin_ray.cache.sizing import activation_reserve_bytes
from spin_ray.cache.stats import KVStats
from spin_ray.engine.batch_inputs import GraphBatch, build_batch_inputs
from spin_ray.engine.config import DEFAULT_CHUNK_TOKENS, WARMUP_OUTPUT_TOKENS, EngineConfig
from spin_ray.engine.decode_graphs import DecodeGraphs
from spin_ray.engine.detokenizer import Detokenizer
from spin_ray.engine.host_page_tables import HostPageTables
from spin_ray.engine.in_flight import InFlightStep
from spin_ray.engine.kv_cache import build_kv_cache
from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.engine.request import Request, RequestStatus
from spin_ray.engine.sampler import Sampler
from spin_ray.engine.scheduler import Scheduler, SchedulerOutput
from spin_ray.engine.stats import StatLogger, StatsTally
from spin_ray.kernels.paged_prefill_attention import reuse_cudnn_plans_across_lengths
from spin_ray.models.arch import ModelArch
from spin_ray.models.loader import (
    load_model,
    load_random_model,
    load_tokenizer,
    model_arch,
    resolve_model_path,
)
from spin_ray.models.named_shapes import is_named_shape
from spin_ray.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from spin_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_FINISH_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}

Prompt = str | list[int] | Mapping[str, object]


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and the sampler."""

    def __init__(self, config: EngineConfig, progress: bool = True):
        self.device = torch.device(config.device)
        if self.device.type == "cuda":  # before the first prefill's cuDNN SDPA call
            reuse_cudnn_plans_across_lengths()
        self.arch = arch = model_arch(config.model)
        weight_bytes = arch.num_parameters() * _itemsize(config.dtype)
        sched = config.scheduler
        reserve = weight_bytes + activation_reserve_bytes(
            sched.max_num_batched_tokens or DEFAULT_CHUNK_TOKENS,
            arch.hidden_size,
            arch.intermediate_size,
            arch.vocab_size,
            sched.max_num_seqs,
            config.dtype,
        )
        self.kv_cache = kv_cache = build_kv_cache(config, arch, reserve)
        """The KV cache (`EngineKVCache`): page tables, attention backend, stats, layout."""
        capacity = kv_cache.capacity_tokens
        if sched.max_model_len is None:
            model_limit = min(arch.max_position_embeddings, arch.sliding_window or capacity)
            sched = dataclasses.replace(sched, max_model_len=min(model_limit, capacity))
        sched = sched.resolved(arch.max_position_embeddings, capacity)
        self.config = config = dataclasses.replace(config, scheduler=sched)
        kv_cache.presize(sched.max_num_seqs, sched.max_model_len)
        self.page_tables, self.backend = kv_cache.page_tables, kv_cache.backend
        self.host_page_tables = HostPageTables(self.page_tables.tables)
        self.model = _load_model(config, arch, self.backend, progress)
        self.decode_graphs: DecodeGraphs | None = None
        """Replays decode-only steps as CUDA graphs (CUDA, unless `enforce_eager`)."""
        if (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.backend.supports_cuda_graphs
        ):
            self.decode_graphs = DecodeGraphs(
                self.model,
                sched.max_num_seqs,
                self.device,
                page_width=self.backend.graph_page_width(sched.max_model_len),
            )
            self.backend.use_cuda_graphs()
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        self.scheduler = Scheduler(sched, self.page_tables)
        self.default_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = Sampler(self.default_generator)
        self.requests: dict[str, Request] = {}
        """Every request added and not finished (or aborted) yet, by id."""
        self.in_flight: InFlightStep | None = None
        """The step launched last, its tokens not read yet (async scheduling)."""
        self.last_step_tokens = 0
        """Tokens the step whose outputs the last `step()` returned ran through the model:
        prompt chunks and decodes (with async scheduling, the step before that call's)."""
        self.num_preemptions = 0
        """Requests preempted so far (their pages taken back; they are computed again)."""
        self.stat_loggers: list[StatLogger] = []
        """Each gets every `step()`'s (and abort's) `EngineStats` (spin_ray.metrics)."""
        self._tally = StatsTally()
        self._last_kv_snapshot = -math.inf
        self.eos_token_ids = frozenset(arch.eos_token_ids) or (
            frozenset({self.tokenizer.eos_token_id}) - {None}
        )
        logger.info(
            "KV cache: %d pages × %d tokens; max_model_len %d",
            self.page_tables.pool.num_pages,
            self.page_tables.page_size,
            sched.max_model_len,
        )

    # ---------------------------------------------------------------- requests

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_kv: PromptKV | None = None,
    ) -> None:
        """Queue a request. Raises `ValueError` naming the field for bad input. `prompt_kv`:
        the K/V of the prompt's first tokens, computed elsewhere (`PromptKV`); the engine
        stores them at admission and computes the rest of the prompt."""
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(
                f"sampling_params: expected SamplingParams, got {type(params).__name__}"
            )
        text, token_ids = self._tokenize(prompt)
        max_len = self.config.scheduler.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens leave no room to generate within "
                f"max_model_len={max_len}"
            )
        vocab = self.arch.vocab_size
        if any(t >= vocab for t in params.forced_token_ids):
            raise ValueError(f"forced_token_ids: token ids must be below the vocabulary ({vocab})")
        if prompt_kv is not None:
            arch = self.arch
            prompt_kv.check_fits(arch.num_layers, arch.num_kv_heads, arch.head_dim, len(token_ids))
        detokenizer = Detokenizer(self.tokenizer, token_ids, params, self.eos_token_ids, max_len)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(
            request_id,
            token_ids,
            params,
            detokenizer,
            prompt=text,
            arrival_time=arrival_time,
            generator=generator,
        )
        if prompt_kv is not None:
            request.prompt_kv = prompt_kv
            request.num_computed_tokens = prompt_kv.num_tokens
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and give its pages back; unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.backend.release(request_id)
        self._forget(request_id)
        self._drop_dead_in_flight()
        if self.stat_loggers:
            self._tally.finish(request, request.finished_time)
            self._record_stats()

    def has_unfinished_requests(self) -> bool:
        """Requests waiting or running, or a step whose tokens are still to be read."""
        return self.scheduler.has_unfinished() or self.in_flight is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def kv_stats(self) -> KVStats:
        """KV cache statistics: buffer lookups and hits, PCIe bytes, evictions, tier use."""
        return self.kv_cache.stats()

    def warm_up(self) -> None:
        """Compile and capture before the first request, as vLLM does at start-up: two requests
        at once, each one and a half prefill chunks long (so a chunk over a prefix runs too),
        decoding `WARMUP_OUTPUT_TOKENS` tokens (decode batches of 2, then 1). On CUDA that
        compiles the Triton kernels of both paths and captures those batches' decode graphs
        (with the sparse cache's fixed widths, every width's). Nothing of them is kept: their
        pages go back (the cache statistics count them). Only on an idle engine."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up: the engine has requests in flight")
        sched = self.config.scheduler
        outputs = WARMUP_OUTPUT_TOKENS[: sched.max_num_seqs]
        chunk = sched.max_num_batched_tokens
        length = max(1, min(chunk + chunk // 2, sched.max_model_len - max(outputs)))
        prompt = [(7919 * i) % self.arch.vocab_size for i in range(length)]
        for i, n in enumerate(outputs):
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            self.add_request(f"warm-up-{i}", {"prompt_token_ids": prompt}, params)
        while self.has_unfinished_requests():
            self.step()

    def check_integrity(self) -> None:
        """Raise `CacheIntegrityError` if a page is leaked or owned twice."""
        self.page_tables.check_integrity()
        live = {r.request_id for r in self.scheduler.running}
        assert set(self.page_tables.tables) <= live, "a request that is not running holds pages"

    # ---------------------------------------------------------------- step

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of requests that got a token or finished.

        With async scheduling (`EngineConfig.async_scheduling`) a call schedules and launches
        its step, then reads the tokens of the step before (waiting for that one only): the
        GPU runs this step while the host detokenizes the last one's tokens and, at the next
        call, schedules and plans the one after. Outputs come one call after their step, and
        a last call with nothing to schedule reads the final step. A request whose token ends
        it was already scheduled once more: that step's token for it is dropped."""
        started = time.monotonic()
        scheduled = self.scheduler.schedule()
        self.num_preemptions += len(scheduled.preempted)
        for request_id in scheduled.preempted:
            self.backend.release(request_id)
        launched = None if scheduled.is_empty else self._launch(scheduled)
        if self.config.async_scheduling:
            done, self.in_flight = self.in_flight, launched
        else:
            done = launched
        self.last_step_tokens = 0 if done is None else done.num_tokens
        outputs = [] if done is None else self._read(done)
        self._drop_dead_in_flight()
        if self.stat_loggers:
            self._record_stats(
                step_kind=None if done is None else done.kind,
                step_seconds=time.monotonic() - started,
                prompt_tokens=0 if done is None else done.num_prompt_tokens,
                generation_tokens=len(outputs),
                num_preemptions=len(scheduled.preempted),
            )
        return outputs

    def _record_stats(self, **fields) -> None:
        """Hand the call's `EngineStats` to every logger; a cache snapshot goes with it every
        `kv_stats_interval_s`, and whenever the engine is left idle."""
        now = time.monotonic()
        kv = None
        if (
            now - self._last_kv_snapshot >= self.config.kv_stats_interval_s
            or not self.has_unfinished_requests()
        ):
            kv, self._last_kv_snapshot = self.kv_stats(), now
        stats = self._tally.build(
            num_running=self.num_running, num_waiting=self.num_waiting, kv=kv, **fields
        )
        self._tally = StatsTally()
        for logger in self.stat_loggers:
            logger.record(stats)

    def _drop_dead_in_flight(self) -> None:
        """Forget the step in flight once every request of it has finished: its tokens would
        all be dropped (the GPU still runs it; later steps queue behind)."""
        if self.in_flight is not None and not self.in_flight.live:
            self.in_flight = None

    def _launch(self, scheduled: SchedulerOutput) -> InFlightStep:
        """Run the step's forwards and sample on the device; nothing waits for the GPU."""
        self.host_page_tables.keep_only(c.request.request_id for c in scheduled.chunks)
        pending = self.in_flight.device_tokens if self.in_flight is not None else None
        for chunk in scheduled.chunks:
            if chunk.request.prompt_kv is not None:
                self._store_prompt_kv(chunk.request)
        logits, sample_ids = [], []
        for part, graph in self._forwards(scheduled):
            inputs = build_batch_inputs(
                part, self.host_page_tables, self.page_tables.page_size, self.device, graph,
                pending,
            )  # fmt: skip
            self.backend.plan(inputs.attention)
            if graph is not None:  # [Bp, V] -> [M, V]
                run = self.decode_graphs.run(inputs, self.backend.graph_key())
                logits.append(run[inputs.sample_rows])
            else:
                hidden = self.model.forward(inputs.input_ids, inputs.positions)  # [N, H]
                logits.append(self.model.compute_logits(hidden[inputs.sample_rows]))  # [M, V]
            sample_ids.extend(inputs.sample_request_ids)
        for chunk in scheduled.chunks:
            chunk.request.num_computed_tokens += chunk.num_new_tokens
        requests = tuple(self.requests[rid] for rid in sample_ids)
        sampled = None
        if requests:
            sampled = self.sampler.sample_async(
                torch.cat(logits) if len(logits) > 1 else logits[0],
                [r.sampling_params for r in requests],
                [r.generator for r in requests],
                [_forced_token(r) for r in requests],
            )
            for request in requests:
                request.num_pending_tokens += 1
        prompt_tokens = sum(c.num_new_tokens for c in scheduled.chunks if c.num_new_tokens > 1)
        return InFlightStep(scheduled.num_batched_tokens, prompt_tokens, requests, sampled)

    def _store_prompt_kv(self, request: Request) -> None:
        """Write a just-admitted request's imported prompt K/V into its pages (once; after a
        preemption the whole context is computed again)."""
        kv, request.prompt_kv = request.prompt_kv, None
        if request.num_computed_tokens < kv.num_tokens:  # preempted before its first step
            return
        page_size = self.page_tables.page_size
        positions = np.arange(kv.num_tokens)  # [T]
        table = self.host_page_tables.row(request.request_id)  # [pages]
        slots = table[positions // page_size] * page_size + positions % page_size
        slots = torch.from_numpy(slots.astype(np.int64)).to(self.device)  # [T]
        dtype = self.config.dtype
        self.backend.store_prompt_kv(
            request.request_id,
            slots,
            [k.to(self.device, dtype) for k in kv.k],
            [v.to(self.device, dtype) for v in kv.v],
        )

    def _read(self, step: InFlightStep) -> list[RequestOutput]:
        """Wait for the step's tokens and append them; a request that finished (or was
        aborted) since the step was launched drops its token."""
        if step.sampled is None:
            return []
        sampled = step.sampled.result()
        now = time.monotonic()  # the sampled ids are on the host: the step is done
        outputs = []
        for row, request in enumerate(step.requests):
            request.num_pending_tokens -= 1
            if request.is_finished:
                continue
            logprob = sampled.logprobs[row] if sampled.logprobs is not None else None
            outputs.append(self._append_token(request, sampled.token_ids[row], logprob, now))
        return outputs

    def _forwards(
        self, scheduled: SchedulerOutput
    ) -> list[tuple[SchedulerOutput, GraphBatch | None]]:
        """The forwards that run the step, each with its CUDA-graph layout (None: eager): one,
        a graph batch if the step only decodes; with a backend that `split_mixed_steps`, a
        mixed step's decode rows as a graph batch, then its prefill chunks eagerly."""
        graphs = self.decode_graphs
        if graphs is None:
            return [(scheduled, None)]
        decode = tuple(c for c in scheduled.chunks if c.num_new_tokens == 1)
        if len(decode) == len(scheduled.chunks):
            return [(scheduled, graphs.layout(len(decode)))]
        graph = graphs.layout(len(decode)) if decode and self.backend.split_mixed_steps else None
        if graph is None:
            return [(scheduled, None)]
        prefill = tuple(c for c in scheduled.chunks if c.num_new_tokens > 1)
        return [
            (dataclasses.replace(scheduled, chunks=decode), graph),
            (dataclasses.replace(scheduled, chunks=prefill), None),
        ]

    def _append_token(
        self, request: Request, token_id: int, logprob: TokenLogprob | None, now: float
    ) -> RequestOutput:
        if self.stat_loggers:
            self._tally.token(request, now)
        request.output_token_ids.append(token_id)
        request.last_token_time = now
        if request.first_token_time is None:
            request.first_token_time = now
        if logprob is not None:
            request.logprobs.append(logprob)
        finish = request.detokenizer.append(token_id)
        if finish is not None:
            request.stop_reason = finish.stop_reason
            status = _FINISH_STATUS[finish.reason]
            self.scheduler.finish(request, status)
            self.backend.release(request.request_id)
            if self.stat_loggers:
                self._tally.finish(request, now)
        output = self._output(request)
        if finish is not None:
            self._forget(request.request_id)
        return output

    def _output(self, request: Request) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=request.detokenizer.text,
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=(
                list(request.logprobs) if request.sampling_params.logprobs is not None else None
            ),
        )
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
            num_output_tokens=len(request.output_token_ids),
            num_preemptions=request.num_preemptions,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.is_finished,
            metrics=metrics,
        )

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" not in prompt:
                raise ValueError("prompt: a dict prompt needs the key 'prompt_token_ids'")
            token_ids = prompt["prompt_token_ids"]
        else:
            token_ids = prompt
        if not isinstance(token_ids, (list, tuple)):
            raise ValueError(
                f"prompt_token_ids: expected a list of ints, got {type(token_ids).__name__}"
            )
        token_ids = list(token_ids)
        if not token_ids:
            raise ValueError("prompt_token_ids: must not be empty")
        vocab = self.arch.vocab_size
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(
                    f"prompt_token_ids: token id {t!r} is outside the vocabulary [0, {vocab})"
                )
        return None, token_ids


def _load_model(config: EngineConfig, arch: ModelArch, backend, progress: bool):
    """A checkpoint's weights, or for a named shape random weights made on the device (for
    speed work without a checkpoint)."""
    if is_named_shape(config.model):
        return load_random_model(arch, backend, config.dtype, config.device, seed=config.seed)
    return load_model(
        resolve_model_path(config.model),
        backend,
        config.dtype,
        config.device,
        max_model_len=config.scheduler.max_model_len,
        progress=progress,
    )


def _forced_token(request: Request) -> int:
    """The token the request's next output must be (teacher forcing), or -1: sample it."""
    forced = request.sampling_params.forced_token_ids
    return forced[request.num_output_tokens] if request.num_output_tokens < len(forced) else -1


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
