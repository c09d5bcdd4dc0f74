"""The offline API, in the shape vLLM users know: `LLM(...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from spin_ray.cache.stats import KVStats
from spin_ray.engine.llm_engine import LLMEngine, Prompt
from spin_ray.engine.options import engine_config, options_doc
from spin_ray.outputs import RequestOutput
from spin_ray.sampling_params import SamplingParams
from spin_ray.sparse.algorithm_config import AlgorithmConfig
from spin_ray.sparse.config import SparseConfig

Message = Mapping[str, str]


class LLM:
    """A model with its engine, for batch generation in one process.

    >>> llm = LLM(model="spin-tiny", device="cpu")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    >>> out[0].outputs[0].text

    `sparse` makes the KV cache tiered (SPIN): an algorithm's name ("quest", "shadowkv",
    "retroinfer", "seer", "full") or settings (`spin_ray.sparse.ShadowKVConfig(chunk_size=4)`),
    a whole `SparseConfig`, or a mapping of its fields; without it (and without any
    SparseConfig option) the engine is dense, all KV in HBM. `metrics_port`: serve the engine's
    Prometheus metrics at http://127.0.0.1:<port>/metrics (docs/observability.md). Every other
    keyword is an option of the engine's configs, listed below (spin_ray/engine/options.py).
    """

    def __init__(
        self,
        model: str = "spin-tiny",
        *,
        sparse: str | AlgorithmConfig | SparseConfig | Mapping | None = None,
        progress: bool = True,
        metrics_port: int | None = None,
        **options: Any,
    ):
        config = engine_config(model, sparse, **options)
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


LLM.__doc__ += options_doc()
