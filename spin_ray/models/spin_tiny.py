"""spin-tiny, the built-in default model: a small Llama-3.1-architecture checkpoint that
spin-ray writes on first use, so the CLI, the server and the tests run on any machine without
a download.

Its weights are RANDOM (a fixed-seed `torch.Generator`, not trained): it produces gibberish,
deterministically. It exists to exercise the whole stack — llama3 RoPE scaling, GQA, a byte-level
tokenizer with a chat template — not to say anything meaningful. Point `--model` at a real
checkpoint folder or hub id for real text.

The weights come from our own generator rather than transformers' initialisation, so the bytes
of `model.safetensors` do not depend on the transformers version.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from spin_ray.models.byte_tokenizer import BOS_ID, EOS_IDS, VOCAB_SIZE, build_byte_tokenizer
from spin_ray.models.cache_dir import cache_dir, ensure_folder

NAME = "spin-tiny-v1"
"""Folder name in the cache; bump the version when the recipe changes."""
SEED = 20240611
CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=list(EOS_IDS),
    torch_dtype="float32",
)
"""Hugging Face config of spin-tiny (Llama 3.1's layout at a small size)."""


def ensure_spin_tiny() -> Path:
    """The spin-tiny folder, written on first use (atomically: `ensure_folder`)."""
    return ensure_folder(cache_dir() / NAME, lambda folder: write_spin_tiny(folder))


def write_spin_tiny(folder: Path) -> None:
    """Write config, generation config, weights and tokenizer of spin-tiny into `folder`."""
    LlamaConfig(**CONFIG).save_pretrained(folder)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": list(EOS_IDS)}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(random_weights(), folder / "model.safetensors", metadata={"format": "pt"})
    build_byte_tokenizer().save_pretrained(folder)


def random_weights() -> dict[str, torch.Tensor]:
    """Hugging Face-named fp32 tensors, drawn in a fixed order from one seeded generator.

    Projections are normal with std 1/sqrt(fan_in) (activations stay O(1), attention is
    position-sensitive rather than uniform), embeddings normal(0, 1), norms 1.
    """
    c = CONFIG
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}

    generator = torch.Generator().manual_seed(SEED)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape)
        elif name == "model.embed_tokens.weight":
            weights[name] = torch.randn(shape, generator=generator)
        else:
            weights[name] = torch.randn(shape, generator=generator) * shape[1] ** -0.5
    return weights
