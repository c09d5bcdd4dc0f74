"""The engine end to end on tiny random checkpoints of every family, against transformers."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from checkpoints import FAMILIES, make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from spin_ray import SamplingParams
from spin_ray.cli import main as cli_main
from spin_ray.sparse import QuestConfig

PROMPT_LENS = (3, 9, 21, 38)  # page_size 4: within one page, across several
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_tiny_checkpoint(root / family, family) for family in FAMILIES}


def random_prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(256) for _ in range(n)]} for n in lengths]


def reference_logprobs(path, prompt_ids, output_ids):
    """transformers' log-softmax at each position that predicted an output token."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [T, V]
    start = len(prompt_ids) - 1
    return logits.log_softmax(-1)[start : start + len(output_ids)]  # [n_out, V]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prompts", "chunked-prefill"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_and_logprobs_match_transformers(family, chunked, checkpoints, make_llm):
    path = checkpoints[family]
    llm = make_llm(
        model=str(path),
        dtype="float32",
        page_size=4,
        max_model_len=128,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=7 if chunked else None,  # chunks cut prompts mid-page
    )
    prompts = random_prompts(PROMPT_LENS)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == MAX_TOKENS
        ref = reference_logprobs(path, prompt["prompt_token_ids"], completion.token_ids)
        for step, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert lp.token_id == token
            # greedy picks the reference's argmax (up to a numerical tie)
            assert ref[step].max() - ref[step, token] < 1e-4, f"step {step}"
            assert lp.logprob == pytest.approx(ref[step, token].item(), abs=1e-4)
            assert len(lp.top) == 3
            for alt, alt_lp in lp.top.items():
                assert alt_lp == pytest.approx(ref[step, alt].item(), abs=1e-4)


def test_chunk_sizes_give_identical_tokens(make_llm):
    prompts = random_prompts((5, 30, 61), seed=1)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = []
    for chunk in (None, 3, 16):
        llm = make_llm(
            model="spin-tiny",
            page_size=8,
            max_model_len=256,
            enable_chunked_prefill=chunk is not None,
            max_num_batched_tokens=chunk,
        )
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1] == runs[2]


def test_preemption_then_resumption_gives_the_same_tokens(make_llm):
    prompts = random_prompts((20, 22, 24, 26), seed=2)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    roomy = make_llm(model="spin-tiny", page_size=4, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]

    # 24 pages hold one finished request (12 pages) and a half: the scheduler must preempt.
    tight = make_llm(model="spin-tiny", page_size=4, max_model_len=64, num_pages=24)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    preemptions = sum(o.metrics.num_preemptions for o in outputs)
    assert preemptions > 0 and tight.llm_engine.num_preemptions == preemptions
    assert roomy.llm_engine.num_preemptions == 0


def test_seeded_sampling_is_reproducible_across_batches(make_llm):
    llm = make_llm(model="spin-tiny")
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    prompt = random_prompts((9,), seed=3)[0]
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = (
        llm.generate(
            random_prompts((4, 17), seed=4) + [prompt], [other, other, seeded], use_tqdm=False
        )[2]
        .outputs[0]
        .token_ids
    )
    assert alone == mixed
    reseeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    assert llm.generate([prompt], reseeded, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_stop_token_ids_and_stop_strings_end_the_request(make_llm):
    llm = make_llm(model="spin-tiny")
    prompt = {"prompt_token_ids": [72, 101, 108, 108, 111]}
    free = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    tokens, text = free[0].outputs[0].token_ids, free[0].outputs[0].text

    stop_token = tokens[6]
    out = llm.generate(
        [prompt],
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop_token]),
    )[0].outputs[0]
    assert out.token_ids == tokens[: tokens.index(stop_token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)

    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    out = llm.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    )[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_abort_gives_pages_back_at_once(make_llm):
    llm = make_llm(model="spin-tiny", page_size=4, max_num_batched_tokens=16)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(random_prompts((40, 6, 6), seed=5)):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(3):
        engine.step()
    pool = engine.page_tables.pool
    held = pool.num_used
    assert held > 0 and engine.page_tables.table("r0")  # r0 is mid-prefill
    engine.abort_request("r0")
    engine.check_integrity()
    assert pool.num_used < held and not engine.page_tables.table("r0")
    engine.abort_request("r1")  # decoding
    engine.abort_request("r2")
    engine.abort_request("unknown")  # ignored
    assert pool.num_used == 0 and not engine.has_unfinished_requests()


BAD_INPUTS = [
    ("", SamplingParams(), "prompt"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [1] * 300}, SamplingParams(), "max_model_len"),
    ({"prompt_token_ids": [5, 10**6]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [5, -1]}, SamplingParams(), "prompt_token_ids"),
    ({"tokens": [5]}, SamplingParams(), "prompt_token_ids"),
]


@pytest.mark.parametrize("prompt,params,field", BAD_INPUTS)
def test_bad_prompts_raise_value_error_and_the_engine_keeps_running(
    prompt, params, field, make_llm
):
    llm = make_llm(model="spin-tiny", max_model_len=256)
    good = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(ValueError, match=field):
        llm.generate([good, prompt], params, use_tqdm=False)  # one bad prompt: nothing runs
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.page_tables.pool.num_used == 0
    assert llm.generate([good], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_path_names_the_field(tmp_path):
    from spin_ray import LLM

    with pytest.raises(ValueError, match="model"):
        LLM(model=str(tmp_path / "no-such-model"), device="cpu")


def test_chat_applies_the_template(make_llm):
    llm = make_llm(model="spin-tiny")
    messages = [{"role": "user", "content": "Hello there"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_cli_generate_prints_json(capsys):
    code = cli_main(
        [
            "generate",
            "--model",
            "spin-tiny",
            "--device",
            "cpu",
            "--prompt",
            "Hi",
            "--max-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["prompt"] == "Hi" and record["finish_reason"] in ("stop", "length")
    assert 1 <= len(record["token_ids"]) <= 5


def test_cli_reports_bad_input_without_a_traceback(capsys):
    code = cli_main(["generate", "--device", "cpu", "--prompt", "Hi", "--max-tokens", "0"])
    assert code == 2
    assert "max_tokens" in capsys.readouterr().err


def test_cli_sparse_flags_reach_the_engine(capsys):
    """The generate command's sparse flags build the two-tier engine; with a budget covering
    the whole context quest gives dense's tokens."""
    from spin_ray.cli import build_parser
    from spin_ray.commands.engine_args import engine_kwargs, sparse_kwargs

    base = ["generate", "--device", "cpu", "--prompt", "Hello there", "--max-tokens", "6", "--json"]
    sparse = ["--sparse", "quest", "--token-budget", "1.0", "--dense-layers", "0"]
    args = build_parser().parse_args(base + sparse)
    kwargs = {**engine_kwargs(args), **sparse_kwargs(args)}
    assert (kwargs["sparse"], kwargs["token_budget"], kwargs["dense_layers"]) == (
        QuestConfig(),
        1.0,
        0,
    )

    assert cli_main(base) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(base + sparse) == 0
    quest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert quest["token_ids"] == dense["token_ids"]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_last_step_tokens_counts_prompt_chunks_and_decodes(make_llm, async_scheduling):
    llm = make_llm(
        model="spin-tiny", page_size=4, max_num_batched_tokens=16, async_scheduling=async_scheduling
    )
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("r0", random_prompts((40,), seed=3)[0], params)
    counts = []
    while engine.has_unfinished_requests():
        engine.step()
        counts.append(engine.last_step_tokens)
    # the 40-token prompt in chunks of 16, 16 and 8 (which samples the first token), then two
    # decodes; async, each step's count comes with its outputs, one call later (the last call
    # launches nothing: the third token ends the request by length)
    expected = [16, 16, 8, 1, 1]
    assert counts == ([0, *expected] if async_scheduling else expected)


def test_a_prompt_waits_for_pages_for_all_of_it(make_llm):
    """A waiting prompt is admitted only once pages for the whole of it are free: admitted on
    its first chunk's pages, it would be preempted (its chunks thrown away) at the next chunk."""
    prompts = random_prompts((40, 40), seed=4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    roomy = make_llm(model="spin-tiny", page_size=4, max_num_batched_tokens=16)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # 14 pages of 4 tokens: the first request (12 pages at its end) leaves room for the second
    # one's first chunk, never for its whole prompt (10 pages)
    tight = make_llm(model="spin-tiny", page_size=4, max_num_batched_tokens=16, num_pages=14)
    engine = tight.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
        if engine.requests.get("r1") and engine.requests["r1"].num_computed_tokens:
            assert "r0" not in engine.requests or engine.requests["r0"].is_finished
    assert engine.num_preemptions == 0
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_short_request_is_not_held_behind_a_long_prefill(make_llm, async_scheduling):
    """Head-of-line blocking: a 4-token request arriving while a 1,600-token prompt prefills in
    96-token steps gets its first token within two steps (the reserve admits it at once), not
    after the ~16 steps of the long prompt's remaining chunks; the long prompt's tokens are
    those of a run on its own."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    long_prompt = {"prompt_token_ids": [(7 * i) % 250 + 1 for i in range(1600)]}
    alone = make_llm(max_num_batched_tokens=96, async_scheduling=async_scheduling)
    expected = alone.generate([long_prompt], params)[0].outputs[0].token_ids

    llm = make_llm(max_num_batched_tokens=96, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    engine.add_request("long", long_prompt, params)
    engine.step()
    engine.add_request("short", {"prompt_token_ids": [5, 6, 7, 8]}, params)
    started = time.monotonic()
    calls, first_token_s, long_ids = 0, None, None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        calls += 1
        for out in outputs:
            if out.request_id == "short" and first_token_s is None:
                first_token_s, short_calls = time.monotonic() - started, calls
            if out.request_id == "long" and out.finished:
                long_ids = out.outputs[0].token_ids
                long_done_s = time.monotonic() - started
    assert short_calls <= 2 + async_scheduling  # async: outputs come one call later
    assert first_token_s < long_done_s / 4  # measured: the short TTFT beside the long prefill
    assert long_ids == expected
