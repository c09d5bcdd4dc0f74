"""Tiny random Hugging Face checkpoints of every supported family, made with transformers'
own model classes and `save_pretrained` (nothing downloaded).

Weights are redrawn with scales that keep activations O(1) (the default 0.02 init makes
attention nearly uniform, which would hide position and masking bugs), norm weights and biases
are non-trivial so that loading them wrongly shows. Every checkpoint carries spin-tiny's
byte-level tokenizer, so engines can load it like any model folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from spin_ray.models.byte_tokenizer import BOS_ID, EOS_IDS, VOCAB_SIZE, build_byte_tokenizer

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=list(EOS_IDS),
    tie_word_embeddings=False,
)
_LLAMA3_SCALING = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,  # small, so positions in tests span all three bands
)

FAMILIES: dict[str, PretrainedConfig] = {
    # Llama 3.1 layout: llama3 RoPE scaling, GQA (4 q heads / 2 kv heads)
    "llama3": LlamaConfig(**_COMMON, rope_theta=10000.0, rope_scaling=_LLAMA3_SCALING),
    # Qwen2/2.5: biases on q/k/v
    "qwen2": Qwen2Config(**_COMMON, rope_theta=1000000.0),
    # Qwen3: q/k RMSNorm, head_dim 32 != hidden / heads = 16
    "qwen3": Qwen3Config(**_COMMON, head_dim=32, rope_theta=1000000.0),
    # Mistral v0.3: no sliding window
    "mistral": MistralConfig(**_COMMON, rope_theta=1000000.0, sliding_window=None),
    # tied embeddings, plain multi-head attention (kv heads = q heads)
    "llama-tied": LlamaConfig(
        **(_COMMON | dict(num_key_value_heads=4, tie_word_embeddings=True)), rope_theta=500000.0
    ),
}
"""Tiny config of each family, by name."""


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """A copy of the family's tiny config with `overrides` applied."""
    return type(FAMILIES[family]).from_dict(FAMILIES[family].to_dict() | overrides)


def tiny_hf_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A transformers model of `config` in fp32 with O(1)-scaled random weights."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head shows up once
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[1] ** -0.5)
    return model


def make_tiny_checkpoint(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Save a tiny random checkpoint of `family` (fp32 safetensors + tokenizer) to `folder`."""
    tiny_hf_model(tiny_config(family, **overrides), seed).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return Path(folder)
