"""Models against transformers: tiny random checkpoints of each family are loaded into spin-ray's
decoder and run over a paged KV cache (packed batches, pages scrambled, prompts crossing page
boundaries, chunked prefill, decode), and every logit is compared with transformers' forward."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from checkpoints import FAMILIES, make_tiny_checkpoint, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from spin_ray.attention.dense import DenseAttentionBackend
from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.cache.kv_cache import KVCache, KVCacheShape
from spin_ray.models import spin_tiny
from spin_ray.models.arch import ModelArch
from spin_ray.models.byte_tokenizer import VOCAB_SIZE
from spin_ray.models.loader import (
    _target,
    load_arch,
    load_model,
    load_random_model,
    resolve_model_path,
)
from spin_ray.models.named_shapes import NAMED_SHAPES, named_shape_arch, named_shape_config
from spin_ray.models.rope import Llama3RopeScaling, rope_inv_freq

PAGE_SIZE = 4
TOL = dict(atol=1e-4, rtol=1e-4)


class PagedRun:
    """Drives a loaded model step by step over a small paged KV cache whose pages are handed
    out in a scrambled order, building `AttentionMetadata` as the engine would."""

    def __init__(self, model, num_pages: int = 48, dtype=torch.float32):
        arch = model.arch
        shape = KVCacheShape(
            arch.num_layers, num_pages, PAGE_SIZE, arch.num_kv_heads, arch.head_dim
        )
        model.backend = self.backend = DenseAttentionBackend(KVCache(shape, dtype, "cpu"))
        self.model = model
        self.free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(1)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Append each sequence's new tokens in one packed forward; logits [n, V] per sequence."""
        ids, positions, slots, lens, ctxs, tables = [], [], [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lengths.get(seq, 0)
            end = self.lengths[seq] = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * PAGE_SIZE < end:
                table.append(self.free.pop())
            ids += tokens
            positions += range(start, end)
            slots += [table[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(start, end)]
            lens.append(len(tokens))
            ctxs.append(end)
            tables.append(table)
        width = max(map(len, tables))
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(
                [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32
            ),
            context_lens=torch.tensor(ctxs, dtype=torch.int32),
            page_table=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32
            ),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_lens_cpu=tuple(lens),
            context_lens_cpu=tuple(ctxs),
            page_size=PAGE_SIZE,
            request_ids=tuple(chunks),
        )
        self.backend.plan(meta)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), torch.tensor(positions))  # [N, H]
            logits = self.model.compute_logits(hidden)  # [N, V]
        return dict(zip(chunks, logits.split(lens)))


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:  # [T, V]
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def prompts(n: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (length,), generator=g).tolist() for length in lengths]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """family → (folder, transformers model loaded from it)."""
    loaded = {}

    def get(family: str):
        if family not in loaded:
            folder = tiny_checkpoint(family)
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            loaded[family] = folder, hf
        return loaded[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_prefill_then_decode_matches_transformers(family, checkpoint):
    folder, hf = checkpoint(family)
    model = load_model(folder, None, torch.float32, "cpu", progress=False)
    run = PagedRun(model)
    seqs = dict(zip("abc", prompts(VOCAB_SIZE, [9, 3, 6])))  # crosses pages of 4

    out = run.step(seqs)  # one packed prefill of three prompts
    for seq, tokens in seqs.items():
        torch.testing.assert_close(out[seq], hf_logits(hf, tokens), **TOL)

    for _ in range(2):  # decode-only steps
        for seq, tokens in seqs.items():
            tokens.append(int(out[seq][-1].argmax()))
        out = run.step({seq: tokens[-1:] for seq, tokens in seqs.items()})
        for seq, tokens in seqs.items():
            torch.testing.assert_close(out[seq][0], hf_logits(hf, tokens)[-1], **TOL)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_chunked_prefill_mixed_with_decode_matches_transformers(family, checkpoint):
    folder, hf = checkpoint(family)
    model = load_model(folder, None, torch.float32, "cpu", progress=False)
    run = PagedRun(model)
    long, short = prompts(VOCAB_SIZE, [11, 5], seed=1)

    first = run.step({"long": long[:6], "short": short})
    next_short = int(first["short"][-1].argmax())
    second = run.step({"long": long[6:], "short": [next_short]})  # chunk 2 attends to its prefix

    full = hf_logits(hf, long)
    torch.testing.assert_close(torch.cat([first["long"], second["long"]]), full, **TOL)
    torch.testing.assert_close(second["short"][0], hf_logits(hf, short + [next_short])[-1], **TOL)


def test_bfloat16_load_tracks_float32(checkpoint):
    folder, hf = checkpoint("llama3")
    model = load_model(folder, None, torch.bfloat16, "cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = prompts(VOCAB_SIZE, [7], seed=2)[0]
    logits = PagedRun(model, dtype=torch.bfloat16).step({"s": tokens})["s"]
    ref = hf_logits(hf, tokens)
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()


def test_rope_inv_freq_matches_transformers_llama3():
    config = tiny_config("llama3")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 32)
    ours = rope_inv_freq(config.head_dim, 10000.0, scaling)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    plain = rope_inv_freq(config.head_dim, 10000.0, None)
    assert (ours < plain).any() and (ours == plain).any()  # the test exercises both bands


def test_missing_tensor_is_named(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "qwen2")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.bias\[1\]"):
        load_model(folder, None, torch.float32, "cpu", progress=False)


def test_wrong_shape_is_named(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "llama3")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*has shape.*expected"):
        load_model(folder, None, torch.float32, "cpu", progress=False)


def test_sliding_window_limits_max_model_len(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "mistral", sliding_window=16)
    assert load_model(folder, None, torch.float32, "cpu", max_model_len=16, progress=False)
    with pytest.raises(ValueError, match="max_model_len.*sliding-window"):
        load_model(folder, None, torch.float32, "cpu", max_model_len=17, progress=False)


def hf_dict(family: str, **overrides) -> dict:
    cfg = tiny_config(family).to_dict() | overrides
    cfg["architectures"] = [type(FAMILIES[family]).__name__.replace("Config", "ForCausalLM")]
    return cfg


def test_arch_reads_every_family():
    llama = ModelArch.from_hf_config(hf_dict("llama3"), {"eos_token_id": [260, 300]})
    assert llama.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 32)
    assert llama.eos_token_ids == (257, 260, 300)
    assert (llama.num_kv_heads, llama.head_dim) == (2, 16)
    qwen2 = ModelArch.from_hf_config(hf_dict("qwen2"))
    assert qwen2.attention_bias and not qwen2.output_bias and qwen2.sliding_window is None
    qwen3 = ModelArch.from_hf_config(hf_dict("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.attention_bias
    assert ModelArch.from_hf_config(hf_dict("llama-tied")).tie_word_embeddings
    old_format = {k: v for k, v in hf_dict("llama3").items() if k != "rope_parameters"}
    old_format |= {
        "rope_theta": 10000.0,
        "rope_scaling": dict(
            type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    }
    assert ModelArch.from_hf_config(old_format) == replace(llama, eos_token_ids=(257, 260))


def test_arch_rejects_unsupported_configs():
    with pytest.raises(ValueError, match="architectures.*GPT2LMHeadModel"):
        ModelArch.from_hf_config(hf_dict("llama3") | {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="model_type.*gpt2"):
        ModelArch.from_hf_config(hf_dict("llama3") | {"architectures": None, "model_type": "gpt2"})
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(ValueError, match="rope_scaling.*yarn"):
        ModelArch.from_hf_config(hf_dict("qwen3") | {"rope_parameters": yarn})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelArch.from_hf_config(hf_dict("llama3") | {"num_key_value_heads": 3})


def test_resolve_model_path_errors_name_model(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ValueError, match="model: .*not an existing folder"):
        resolve_model_path(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(ValueError, match="model: .*no config.json"):
        resolve_model_path(str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="model: 'spin-ray-tests/absent' not found locally"):
        resolve_model_path("spin-ray-tests/absent")
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "llama3")
    assert resolve_model_path(str(folder)) == folder


def test_spin_tiny_is_deterministic_and_matches_transformers(tmp_path, monkeypatch):
    folders = []
    for name in ("one", "two"):
        monkeypatch.setenv("SPIN_RAY_CACHE", str(tmp_path / name))
        folders.append(resolve_model_path("spin-tiny"))
    assert folders[0] == tmp_path / "one" / spin_tiny.NAME
    for file in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (folders[0] / file).read_bytes() == (folders[1] / file).read_bytes(), file
    assert os.listdir(tmp_path / "one") == [spin_tiny.NAME]  # no temporary folder left

    model = load_model(folders[0], None, torch.float32, "cpu", progress=False)
    assert model.arch.rope_scaling is not None and model.arch.num_kv_heads == 2
    hf = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).eval()
    tokens = prompts(VOCAB_SIZE, [10], seed=3)[0]
    torch.testing.assert_close(
        PagedRun(model).step({"s": tokens})["s"], hf_logits(hf, tokens), **TOL
    )


def test_spin_tiny_concurrent_first_use(tmp_path, monkeypatch):
    """A writer that loses the race to create the folder keeps the winner's and cleans up."""
    monkeypatch.setenv("SPIN_RAY_CACHE", str(tmp_path))
    real_write = spin_tiny.write_spin_tiny

    def racing_write(folder):
        real_write(folder)
        (tmp_path / spin_tiny.NAME).mkdir()  # the other process renames its folder first
        (tmp_path / spin_tiny.NAME / "config.json").write_text("{}")

    monkeypatch.setattr(spin_tiny, "write_spin_tiny", racing_write)
    assert spin_tiny.ensure_spin_tiny() == tmp_path / spin_tiny.NAME
    assert os.listdir(tmp_path) == [spin_tiny.NAME]
    assert (tmp_path / spin_tiny.NAME / "config.json").read_text() == "{}"


def test_spin_tiny_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIN_RAY_CACHE", str(tmp_path))
    tok = AutoTokenizer.from_pretrained(resolve_model_path("spin-tiny"))
    assert len(tok) == VOCAB_SIZE
    text = "héllo wörld — 日本語 🎉\n\ttab \x00 end"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) == len(text.encode()) + 1
    assert max(ids[1:]) < 256
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    eos = load_arch(resolve_model_path("spin-tiny")).eos_token_ids
    assert tok.convert_tokens_to_ids("<|eot_id|>") in eos


@pytest.mark.parametrize("name", list(NAMED_SHAPES))
def test_named_shape_parameter_count_matches_transformers(name):
    cfg = named_shape_config(name)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    expected = sum(p.numel() for p in hf.parameters())  # tied weights counted once
    arch = named_shape_arch(name)
    assert arch.num_parameters() == expected
    assert arch.vocab_size >= VOCAB_SIZE  # spin-tiny's tokenizer fits


def test_named_shapes_have_published_numbers():
    llama = named_shape_arch("llama-3.1-8b")
    assert (llama.num_layers, llama.num_kv_heads, llama.vocab_size) == (32, 8, 128256)
    assert llama.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert abs(llama.num_parameters() - 8.03e9) < 0.01e9
    qwen3 = named_shape_arch("qwen3-14b")
    assert (qwen3.num_layers, qwen3.hidden_size, qwen3.head_dim, qwen3.qk_norm) == (
        40,
        5120,
        128,
        True,
    )
    assert named_shape_arch("qwen2.5-7b").attention_bias
    assert named_shape_arch("llama-3.2-1b").tie_word_embeddings
    with pytest.raises(ValueError, match="model: unknown named shape"):
        named_shape_arch("llama-9")


def test_load_random_model_is_seeded_and_runs():
    arch = ModelArch.from_hf_config(hf_dict("qwen3"))
    a, b, c = (load_random_model(arch, None, torch.float32, "cpu", seed=s) for s in (0, 0, 1))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    pa, pb, pc = (dict(m.named_parameters())[qkv] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert abs(pa.std().item() - 0.02) < 0.002
    assert torch.equal(a.model.norm.weight, torch.ones(arch.hidden_size))
    # the same weights in transformers' model give the same logits
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_dict("qwen3"))).eval()
    ours = dict(a.named_parameters())
    with torch.no_grad():
        for hf_name, hf_param in hf.named_parameters():
            name, shard = _target(hf_name, arch)
            param = ours[name]
            if ".qkv_proj." in name:
                param = param.split([arch.q_size, arch.kv_size, arch.kv_size])[shard]
            elif ".gate_up_proj." in name:
                param = param.split(arch.intermediate_size)[shard]
            hf_param.copy_(param)
    tokens = [1, 2, 3, 4, 5]
    torch.testing.assert_close(PagedRun(a).step({"s": tokens})["s"], hf_logits(hf, tokens), **TOL)
