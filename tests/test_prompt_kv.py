"""Prompt K/V computed outside the engine (`PromptKV`, one dense prefill) and handed to
engines: the tokens and logprobs equal those of the engine's own prefill — dense, and sparse
with each algorithm — and teacher-forced tokens come with the logprobs the model gives them."""

from __future__ import annotations

import pytest
import torch

from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.eval.dense_prefill import dense_prompt_kv
from spin_ray.models.loader import load_model, resolve_model_path
from spin_ray.sampling_params import SamplingParams

PROMPT = [(37 * i + 11) % 250 for i in range(150)]
SPARSE = dict(token_budget=64, sink_tokens=16, local_tokens=32, dense_layers=1,
              cpu_cache_tokens=4096)  # fmt: skip


@pytest.fixture(scope="module")
def prompt_kv():
    model = load_model(resolve_model_path("spin-tiny"), None, torch.float32, "cpu", progress=False)
    return dense_prompt_kv(model, PROMPT[:-8])  # the engine prefills the last 8 (one chunk)


def _run(llm, params, prompt_kv=None):
    engine = llm.llm_engine
    engine.add_request("r", {"prompt_token_ids": PROMPT}, params, prompt_kv=prompt_kv)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    return finished[0].outputs[0]


@pytest.mark.parametrize("sparse", [None, "quest", "shadowkv", "retroinfer", "seer"])
def test_imported_prompt_kv_equals_the_engines_prefill(make_llm, prompt_kv, sparse):
    kwargs = {} if sparse is None else dict(sparse=sparse, **SPARSE)
    llm = make_llm(model="spin-tiny", max_model_len=512, **kwargs)
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=0, ignore_eos=True)
    own, imported = _run(llm, params), _run(llm, params, prompt_kv)
    assert imported.token_ids == own.token_ids
    torch.testing.assert_close(
        [p.logprob for p in imported.logprobs], [p.logprob for p in own.logprobs],
        atol=2e-4, rtol=0,
    )  # fmt: skip


def test_forced_tokens_are_taken_with_their_logprobs(make_llm):
    llm = make_llm(model="spin-tiny", max_model_len=512)
    free = _run(llm, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True))
    forced = [t + 1 for t in free.token_ids[:4]]  # not what greedy decoding picks
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True,
                            forced_token_ids=forced)  # fmt: skip
    out = _run(llm, params)
    assert out.token_ids[:4] == forced
    first = out.logprobs[0]  # the same context as the free run's first token
    assert first.logprob == pytest.approx(free.logprobs[0].top.get(forced[0], first.logprob))
    assert first.logprob < free.logprobs[0].logprob  # the greedy token was more likely
    with pytest.raises(ValueError, match="forced_token_ids"):
        SamplingParams(max_tokens=2, forced_token_ids=[1, 2, 3])


def test_prompt_kv_must_fit(make_llm, prompt_kv):
    llm = make_llm(model="spin-tiny", max_model_len=512)
    short = PromptKV(k=prompt_kv.k[:2], v=prompt_kv.v[:2])
    with pytest.raises(ValueError, match="prompt_kv: 2 layers"):
        llm.llm_engine.add_request("x", {"prompt_token_ids": PROMPT}, SamplingParams(),
                                   prompt_kv=short)  # fmt: skip
    with pytest.raises(ValueError, match="last prompt token"):
        llm.llm_engine.add_request("y", {"prompt_token_ids": PROMPT[:142]}, SamplingParams(),
                                   prompt_kv=prompt_kv)  # fmt: skip
