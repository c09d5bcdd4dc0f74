"""Run an `EvalConfig`: at each length, make the cases, compute each case's context K/V once
(dense, `dense_prompt_kv`), then for every setting build its engine, hand it every case with
that K/V and decode: the question (prefilled by the engine over the imported context) and the
answer greedily, the log-likelihood case's scored tokens teacher-forced."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from spin_ray.engine.config import resolve_dtype
from spin_ray.engine.llm_engine import LLMEngine
from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.eval.config import EvalConfig, Setting
from spin_ray.eval.dense_prefill import dense_prompt_kv
from spin_ray.eval.likelihood import LikelihoodCase, likelihood_case
from spin_ray.eval.tasks import TaskCase, make_cases
from spin_ray.llm import LLM
from spin_ray.models.loader import load_model, load_tokenizer, resolve_model_path
from spin_ray.sampling_params import SamplingParams
from spin_ray.sparse.algorithm_config import SeerConfig, algorithm_config
from spin_ray.sparse.presets import preset

LIKELIHOOD_ID = "likelihood"
ANSWER_ROOM = 64
"""Tokens kept for an answer (each task's `max_new_tokens` is below it): a length at the
model's limit gets prompts this much shorter."""
IMPORT_MARGIN = 2
"""Context tokens each engine computes itself (a prefill chunk over the imported K/V), so
that the context's end is prefilled densely in every setting, as a served prompt would be."""


@dataclass
class LengthResult:
    """What every setting scored at one length."""

    length: int
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Setting label → task → each case's score."""
    answers: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Setting label → task → each case's answer text."""
    logprobs: dict[str, list[float]] = field(default_factory=dict)
    """Setting label → log-probability of each scored token of the likelihood case."""
    hit_rates: dict[str, float | None] = field(default_factory=dict)
    """Setting label → HBM buffer hit rate of its decode steps (None: no buffer)."""


@dataclass
class EvalResult:
    config: EvalConfig
    lengths: list[LengthResult]
    seconds: float
    """Wall time of the run (model loads, dense prefills, every setting's decode)."""


def run_eval(config: EvalConfig, progress: bool = True) -> EvalResult:
    start = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    dtype = resolve_dtype(config.dtype, config.device)
    model = load_model(resolve_model_path(config.model), None, dtype, config.device,
                       progress=False)  # fmt: skip
    limit = model.arch.max_position_embeddings
    if max(config.lengths) > limit:
        raise ValueError(f"lengths: {max(config.lengths)} exceeds the model's limit ({limit})")
    results = []
    for length in config.lengths:
        prompt_len = min(length, limit - ANSWER_ROOM)  # at the limit, room for the answers
        cases = [
            case
            for task in config.tasks
            for case in make_cases(tokenizer, task, prompt_len, config.samples, config.seed)
        ]
        ll_case = (
            likelihood_case(tokenizer, length, config.scored_tokens)
            if config.scored_tokens
            else None
        )
        contexts = [c.prompt_token_ids[: c.context_tokens - IMPORT_MARGIN] for c in cases]
        if ll_case is not None:
            contexts.append(ll_case.context_token_ids[:-IMPORT_MARGIN])
        kvs = [
            dense_prompt_kv(model, list(ids))
            for ids in tqdm(contexts, desc=f"Dense prefill at {length}", disable=not progress)
        ]
        result = LengthResult(length)
        bar = tqdm(config.settings, desc=f"Settings at {length}", disable=not progress)
        for setting in bar:
            bar.set_postfix_str(setting.label)
            _run_setting(config, setting, length, limit, cases, ll_case, kvs, result)
            _free_engine_memory(config.device)
        results.append(result)
        del kvs
    return EvalResult(config, results, time.perf_counter() - start)


def _run_setting(
    config: EvalConfig,
    setting: Setting,
    length: int,
    model_limit: int,
    cases: list[TaskCase],
    ll_case: LikelihoodCase | None,
    kvs: list[PromptKV],
    result: LengthResult,
) -> None:
    max_model_len = min(length + ANSWER_ROOM, model_limit)
    requests = len(cases) + (ll_case is not None)
    engine = _engine(config, setting, max_model_len, requests)
    for i, (case, kv) in enumerate(zip(cases, kvs)):
        params = SamplingParams(max_tokens=case.max_new_tokens, temperature=0.0)
        engine.add_request(str(i), {"prompt_token_ids": list(case.prompt_token_ids)}, params,
                           prompt_kv=kv)  # fmt: skip
    if ll_case is not None:
        params = SamplingParams(
            max_tokens=len(ll_case.scored_token_ids), temperature=0.0, logprobs=0,
            ignore_eos=True, forced_token_ids=ll_case.scored_token_ids,
        )  # fmt: skip
        engine.add_request(LIKELIHOOD_ID, {"prompt_token_ids": list(ll_case.context_token_ids)},
                           params, prompt_kv=kvs[-1])  # fmt: skip
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.outputs[0]
    scores = result.scores.setdefault(setting.label, {})
    answers = result.answers.setdefault(setting.label, {})
    for i, case in enumerate(cases):
        text = outputs[str(i)].text
        scores.setdefault(case.task, []).append(case.score(text))
        answers.setdefault(case.task, []).append(text)
    if ll_case is not None:
        result.logprobs[setting.label] = [p.logprob for p in outputs[LIKELIHOOD_ID].logprobs]
    stats = engine.kv_stats()
    result.hit_rates[setting.label] = stats.hits / stats.lookups if stats.lookups else None


def _free_engine_memory(device: str) -> None:
    """Give back the finished setting's KV cache before the next engine sizes its own from the
    free GPU memory (the engine's objects refer to each other, so only a collection frees them)."""
    gc.collect()
    if str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        torch.cuda.empty_cache()


def _engine(config: EvalConfig, setting: Setting, max_model_len: int, requests: int) -> LLMEngine:
    """The setting's engine, sized for every request at once."""
    tokens = requests * (max_model_len + 16)
    kwargs = dict(
        model=config.model, device=config.device, dtype=config.dtype,
        max_model_len=max_model_len, max_num_seqs=requests, seed=config.seed, progress=False,
    )  # fmt: skip
    if config.device == "cpu":
        kwargs["cpu_kv_tokens"] = tokens
    if not setting.is_reference:
        algorithm = algorithm_config(setting.algorithm)
        if isinstance(algorithm, SeerConfig):
            algorithm = SeerConfig(gate_path=config.seer_gate_path)
        spin = replace(
            config.sparse, algorithm=algorithm, token_budget=setting.token_budget,
            cpu_cache_tokens=tokens,  # the default, a share of host RAM, is far more than this
        )  # fmt: skip
        kwargs["sparse"] = preset(setting.mode, spin)
    return LLM(**kwargs).llm_engine
