"""Tiny GGUF files written from tiny transformers models with the `gguf` package's own writer
and quantizer, laid out as llama.cpp's converter lays them out (Llama's q/k rows permuted for
its interleaved RoPE), with spin-tiny's byte-level vocabulary as a "gpt2" tokenizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from spin_ray.models.byte_tokenizer import BOS_ID, EOS_IDS, build_byte_tokenizer

_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute` (rotate-half → interleaved)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2)\
        .reshape(rows.shape)  # fmt: skip


def gguf_tensor_name(hf_name: str) -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{_HF_TO_GGUF[rest]}.{suffix}"


def write_tiny_gguf(
    model: PreTrainedModel, path: Path, arch: str, quant: gguf.GGMLQuantizationType
) -> Path:
    """Write `model` (fp32) as a GGUF of architecture `arch`; 2-D weights quantized to
    `quant` (by `gguf.quants.quantize`), norms and biases F32."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    _add_byte_tokenizer(writer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            values = llama_cpp_permute(values, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            values = llama_cpp_permute(values, cfg.num_key_value_heads)
        name = gguf_tensor_name(hf_name)
        if values.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(values, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_byte_tokenizer(writer: gguf.GGUFWriter) -> None:
    """spin-tiny's byte-level vocabulary as a "gpt2" BPE tokenizer without merges."""
    tokenizer = build_byte_tokenizer()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids) | set(range(256, len(vocab)))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab]
    )
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(vocab))  # transformers derives merges from scores
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_IDS[1])


def reference_from_gguf(path: Path, model_class, **config_overrides) -> PreTrainedModel:
    """transformers' own GGUF loading of `path` (config and dequantized tensors from
    `load_gguf_checkpoint`) into `model_class`, fp32, as `from_pretrained(gguf_file=...)` does
    (which needs accelerate); `config_overrides` fill what its metadata mapping misses (it
    reads no `qwen3.attention.key_length`, so Qwen3's head_dim)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed_config = load_gguf_checkpoint(str(path))["config"] | config_overrides
    config = model_class.config_class(**parsed_config)
    with torch.device("meta"):
        skeleton = model_class(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    model = model_class(config).float().eval()
    state = {name: torch.as_tensor(values) for name, values in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model
