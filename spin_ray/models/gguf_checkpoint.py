"""GGUF checkpoints (llama.cpp's one-file format): architecture, weights and tokenizer read
from one `.gguf` file.

- Architecture: the GGUF's metadata (`llama.embedding_length`, ...) written out as the Hugging
  Face config.json it describes, then read by `ModelArch.from_hf_config` like any checkpoint's.
- Weights: each tensor dequantized to fp32 by the `gguf` package (`gguf.quants.dequantize`),
  then cast and copied to its parameter on the device, one tensor at a time, as safetensors are
  streamed. llama.cpp's converter permutes the rows of Llama's q/k projections for its
  interleaved RoPE; they are permuted back to Hugging Face's rotate-half layout here (as
  transformers' GGUF loader does). Qwen2/Qwen3 GGUFs keep the rotate-half layout.
- Tokenizer and chat template: transformers' conversion of the GGUF's vocabulary
  (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`).

The config files and the converted tokenizer go once per GGUF file (its path, size and mtime)
into a folder of spin-ray's cache (`gguf_sidecar`), so later loads parse neither the GGUF's
metadata nor its vocabulary again (together ~10 s for SmolLM2's 49K-token vocabulary).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from spin_ray.models.arch import ModelArch
from spin_ray.models.cache_dir import cache_dir, ensure_folder

GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""GGUF `general.architecture` values spin-ray loads, and the Hugging Face class of each."""

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""GGUF tensor names (llama.cpp's `blk.{i}.{name}`) → Hugging Face module names."""

_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def find_gguf(folder: Path) -> Path | None:
    """The one `.gguf` file of `folder`; None if it has none; ValueError if several."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_gguf(p))
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ValueError(f"model: folder {str(folder)!r} holds several GGUF files ({names}); "
                         "give the file itself")  # fmt: skip
    return files[0] if files else None


def gguf_sidecar(path: Path) -> Path:
    """The cache folder of `path`'s config.json, generation_config.json and tokenizer files,
    written on first use (checks architecture and quantization types first)."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    final = cache_dir() / "gguf" / f"{path.stem}-{key}"
    return ensure_folder(final, lambda folder: _write_sidecar(path, folder))


def _write_sidecar(path: Path, folder: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(path)
    config = hf_config(reader)
    check_quant_types(reader)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(folder)


def hf_config(reader) -> dict:
    """The Hugging Face config.json of the model a `gguf.GGUFReader` holds."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"model: GGUF architecture {arch!r} is not supported; spin-ray loads "
            f"{', '.join(GGUF_ARCHITECTURES)} GGUF files"
        )
    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise ValueError(
            f"model: GGUF RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}, as in "
            "Llama 3.1+ GGUFs) is not supported; load the Hugging Face checkpoint folder instead"
        )

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    head_dim = meta("attention.key_length", hidden // heads)
    if meta("attention.value_length", head_dim) != head_dim:
        raise ValueError("model: GGUF key and value head sizes differ; not supported")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    eos = [_field(reader, key) for key in _EOS_KEYS if key in reader.fields]
    return dict(
        architectures=[GGUF_ARCHITECTURES[arch]],
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=meta("block_count"),
        intermediate_size=meta("feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta("context_length"),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon"),
        rope_theta=meta("rope.freq_base", 10000.0),
        vocab_size=int(embedding.shape[1]),  # ggml order: [hidden, vocab]
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch != "qwen2" and "blk.0.attn_q.bias" in names,
        hidden_act="silu",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=list(dict.fromkeys(eos)),
        torch_dtype="float32",
    )


def check_quant_types(reader) -> None:
    """Raise ValueError naming every tensor type the `gguf` package cannot dequantize."""
    from gguf import dequantize

    unsupported = {}
    for tensor in reader.tensors:
        try:
            dequantize(tensor.data[:1], tensor.tensor_type)  # one row: checks the type alone
        except NotImplementedError:
            unsupported.setdefault(tensor.tensor_type.name, tensor.name)
    if unsupported:
        listed = ", ".join(f"{kind} (e.g. {name})" for kind, name in unsupported.items())
        raise ValueError(f"model: GGUF quantization types not supported by gguf: {listed}")


def gguf_tensors(
    path: Path, arch: ModelArch
) -> tuple[Iterator[tuple[str, Callable[[], torch.Tensor]]], int]:
    """(Hugging Face name, loader of its fp32 CPU tensor) for every tensor of the GGUF, in file
    order, and how many there are; a tensor is dequantized only when its loader is called."""
    from gguf import dequantize

    stat = path.stat()
    reader = _reader(path.resolve(), stat.st_size, stat.st_mtime_ns)

    def load(tensor, hf_name: str) -> torch.Tensor:
        values = dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # [out, in]
        if arch.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute_rope_rows(values, arch.num_heads)
        elif arch.model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute_rope_rows(values, arch.num_kv_heads)
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy

    def tensors():
        for tensor in reader.tensors:
            hf_name = hf_tensor_name(tensor.name)
            yield hf_name, lambda tensor=tensor, hf_name=hf_name: load(tensor, hf_name)

    return tensors(), len(reader.tensors)


@functools.lru_cache(maxsize=2)
def _reader(path: Path, size: int, mtime_ns: int):
    """The file's `gguf.GGUFReader` (memory-mapped), kept for the next load of the same file
    (size and mtime in the key): parsing a GGUF's metadata, its vocabulary included, costs
    seconds, and `spin-ray eval` builds one engine per setting."""
    from gguf import GGUFReader

    return GGUFReader(path)


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`, and so on."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{suffix}"
    raise ValueError(f"model: unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(
    rows: np.ndarray,  # [heads * D, ...] rows in llama.cpp's interleaved-RoPE order
    heads: int,
) -> np.ndarray:  # [heads * D, ...] rows in Hugging Face's rotate-half order
    """Undo llama.cpp's `permute` of Llama q/k rows: within each head, its row 2i + j came from
    row j * D/2 + i."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _field(reader, key: str, default=...):
    """One metadata value of the GGUF: `default` when absent, or ValueError naming the key when
    no default is given."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"model: GGUF metadata lacks {key!r}")
        return default
    return field.contents()
