"""The engines a benchmark drives, behind one small interface: spin-ray's `LLMEngine` in one of
its modes, or real vLLM's engine (from its offline `LLM`). Both are stepped the same way, so
both are measured the same way."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import numbers
from typing import Protocol

import torch

from spin_ray.bench.config import BenchConfig
from spin_ray.bench.workloads import BenchRequest


class BenchEngine(Protocol):
    mode: str
    vocab_size: int
    special_token_ids: list[int]

    def add(self, request: BenchRequest, arrival_time: float) -> None:
        """Queue `request` (greedy, EOS ignored, `request.output_len` tokens); `arrival_time`
        is its planned arrival on the `time.monotonic()` clock."""

    def step(self) -> list:
        """One engine step; the `RequestOutput`s (cumulative `outputs[0].token_ids`,
        `finished`) of requests that got a token or finished."""

    def last_step_tokens(self) -> int | None:
        """Tokens the last `step()` computed (prompt chunks and decodes); None if the engine
        does not say."""

    def has_unfinished(self) -> bool: ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds."""

    def kv_stats(self) -> dict[str, float] | None:
        """Numeric cache statistics (cumulative counters and times), `preemptions` (requests
        preempted so far) and, with CUDA-graph decode, `graph_captures` and `graph_capture_s`
        (graphs captured so far, seconds of those steps), or None if the engine keeps none."""

    def close(self) -> None:
        """Drop the engine and give its GPU memory back."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def build_engine(mode: str, config: BenchConfig, max_model_len: int) -> BenchEngine:
    if mode == "vllm":
        from spin_ray.bench.vllm_engine import VllmBenchEngine

        return VllmBenchEngine(config, max_model_len)
    return SpinBenchEngine(mode, config, max_model_len)


def free_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class SpinBenchEngine:
    """spin-ray's `LLMEngine`, built through `LLM(...)` with the mode's keyword arguments."""

    def __init__(self, mode: str, config: BenchConfig, max_model_len: int):
        from spin_ray.llm import LLM
        from spin_ray.models.loader import model_arch

        kwargs = dict(
            config.engine_options,
            max_model_len=max_model_len,
            progress=False,
            metrics_port=config.metrics_port,
        )
        sparse = config.engine_sparse(mode, model_arch(config.model).num_layers)
        hbm_tokens = config.sparse.gpu_cache_tokens
        if sparse is not None:
            kwargs["sparse"] = sparse
        elif hbm_tokens is not None:  # the same HBM KV capacity as the tiered modes
            kwargs["num_pages"] = -(-hbm_tokens // config.option("page_size"))
        self.mode = mode
        self.llm = LLM(config.model, **kwargs)
        self.engine = self.llm.llm_engine
        self.vocab_size = min(self.engine.arch.vocab_size, len(self.engine.tokenizer))
        self.special_token_ids = list(self.engine.tokenizer.all_special_ids)

    def add(self, request: BenchRequest, arrival_time: float) -> None:
        from spin_ray.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
        prompt = {"prompt_token_ids": request.prompt_token_ids}
        self.engine.add_request(request.request_id, prompt, params, arrival_time=arrival_time)

    def step(self) -> list:
        return self.engine.step()

    def last_step_tokens(self) -> int:
        return self.engine.last_step_tokens

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def kv_stats(self) -> dict[str, float] | None:
        stats = dataclasses.asdict(self.engine.kv_stats())
        # None fields (phase times under CUDA graphs) are left out: the summary reports None
        numeric = {k: v for k, v in stats.items() if isinstance(v, numbers.Real)}
        numeric["preemptions"] = self.engine.num_preemptions
        graphs = self.engine.decode_graphs
        if graphs is not None:  # CUDA graphs: captures (with any compilation they trigger)
            numeric.update(graph_captures=graphs.captures, graph_capture_s=graphs.capture_seconds)
        return numeric

    def close(self) -> None:
        del self.engine, self.llm
        free_gpu_memory()
