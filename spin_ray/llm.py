"""The offline API, in the shape vLLM users know: `LLM(...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from tqdm.auto import tqdm

from spin_ray.cache.config import CacheConfig
from spin_ray.cache.stats import KVStats
from spin_ray.engine.config import EngineConfig, SchedulerConfig, resolve_device, resolve_dtype
from spin_ray.engine.llm_engine import LLMEngine, Prompt
from spin_ray.outputs import RequestOutput
from spin_ray.sampling_params import SamplingParams
from spin_ray.sparse.config import SparseConfig, sparse_config_from_args

Message = Mapping[str, str]


class LLM:
    """A model with its engine, for batch generation in one process.

    >>> llm = LLM(model="spin-tiny", device="cpu")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    >>> out[0].outputs[0].text
    """

    def __init__(
        self,
        model: str = "spin-tiny",
        *,
        tokenizer: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        page_size: int = 16,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int = 64,
        enable_chunked_prefill: bool = True,
        num_pages: int | None = None,
        gpu_memory_utilization: float = 0.90,
        cpu_kv_tokens: int = 65536,
        seed: int = 0,
        enforce_eager: bool = False,
        async_scheduling: bool = True,
        progress: bool = True,
        sparse: str | None = None,
        mode: str | None = None,
        token_budget: int | float | None = None,
        sink_tokens: int | None = None,
        local_tokens: int | None = None,
        dense_layers: int | None = None,
        buffer_ratio: float | None = None,
        min_buffer_ratio: float | None = None,
        lookahead: bool | None = None,
        lookahead_share: float | None = None,
        gpu_cache_tokens: int | None = None,
        cpu_cache_tokens: int | None = None,
        fused_retrieve: bool | None = None,
        check_invariants: bool | None = None,
        sparse_config: SparseConfig | None = None,
        metrics_port: int | None = None,
    ):
        """`sparse` (an algorithm of `spin_ray.sparse.ALGORITHMS`), `mode` and the fields after
        it set the sparse, two-tier KV cache (`SparseConfig`; `sparse_config` gives every
        field); with none of them the engine is dense, all KV in HBM. `metrics_port`: serve the
        engine's Prometheus metrics at http://127.0.0.1:<port>/metrics (docs/observability.md)."""
        device = resolve_device(device)
        cache = CacheConfig(
            page_size=page_size,
            num_pages=num_pages,
            gpu_memory_utilization=gpu_memory_utilization,
            cpu_kv_tokens=cpu_kv_tokens,
        )
        scheduler = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        sparse_cfg = sparse_config_from_args(
            sparse,
            sparse_config,
            mode=mode,
            token_budget=token_budget,
            sink_tokens=sink_tokens,
            local_tokens=local_tokens,
            dense_layers=dense_layers,
            buffer_ratio=buffer_ratio,
            min_buffer_ratio=min_buffer_ratio,
            lookahead=lookahead,
            lookahead_share=lookahead_share,
            gpu_cache_tokens=gpu_cache_tokens,
            cpu_cache_tokens=cpu_cache_tokens,
            fused_retrieve=fused_retrieve,
            check_invariants=check_invariants,
        )
        config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            device=device,
            dtype=resolve_dtype(dtype, device),
            seed=seed,
            cache=cache,
            scheduler=scheduler,
            sparse=sparse_cfg,
            enforce_eager=enforce_eager,
            async_scheduling=async_scheduling,
        )
        if metrics_port is not None:  # a bad or taken port fails before the model loads
            from spin_ray.metrics import EngineMetrics, engine_labels
            from spin_ray.metrics.prometheus_sink import PrometheusSink, serve_metrics

            serve_metrics(metrics_port)
        self.llm_engine = LLMEngine(config, progress=progress)
        if metrics_port is not None:
            labels = engine_labels(config)
            metrics = EngineMetrics(PrometheusSink(), labels, self.llm_engine.kv_stats())
            self.llm_engine.stat_loggers.append(metrics)
        self._ids = itertools.count()

    def kv_stats(self) -> KVStats:
        """KV cache statistics (see `spin_ray.sparse.KVStats`)."""
        return self.llm_engine.kv_stats()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or `{"prompt_token_ids": [...]}`); outputs come
        back in prompt order. Invalid input raises `ValueError` before anything runs."""
        if isinstance(prompts, (str, Mapping)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(params)} for {len(prompts)} prompts; pass one "
                    "or one per prompt"
                )
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        tokenizer = self.llm_engine.tokenizer
        prompts = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                list(conversation), add_generation_prompt=add_generation_prompt, tokenize=True
            )
            if isinstance(ids, Mapping):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts, params, use_tqdm) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                engine.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            for request_id in added:
                engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in ids]
