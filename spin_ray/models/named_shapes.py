"""Published model shapes with random weights, for speed work where no checkpoint is at hand.

Each entry copies the `config.json` that its Hugging Face repository publishes (the Instruct
release where both exist; sizes are the same as the base model's). Build one with
`load_random_model(named_shape_arch(name), ...)`: weights are random, so only timings mean
anything. They have no tokenizer of their own: use spin-tiny's byte-level tokenizer
(`resolve_model_path("spin-tiny")`), whose ids (< 320) fit every vocabulary here; generated ids
beyond its vocabulary decode to nothing.
"""

from __future__ import annotations

import copy

from spin_ray.models.arch import ModelArch

_LLAMA_3 = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
)

NAMED_SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.1-8B-Instruct
    "llama-3.1-8b": dict(
        _LLAMA_3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
    ),
    # meta-llama/Llama-3.2-1B-Instruct
    "llama-3.2-1b": dict(
        _LLAMA_3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-14B
    "qwen3-14b": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_act="silu",
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        attention_bias=False,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=40,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        max_position_embeddings=32768,
        vocab_size=152064,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=131072,
        max_window_layers=28,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # mistralai/Mistral-7B-Instruct-v0.3
    "mistral-7b": dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        vocab_size=32768,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct with random weights: the shape of smollm2-135m, for
    # comparing a trained model's locality with a random one's (bench/locality.py)
    "smollm2-135m-random": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        vocab_size=49152,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
"""Hugging Face config dicts of the published shapes, by name."""


def is_named_shape(name: str) -> bool:
    return name in NAMED_SHAPES


def named_shape_config(name: str) -> dict:
    """A copy of the published config dict of `name`."""
    if name not in NAMED_SHAPES:
        raise ValueError(f"model: unknown named shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    return copy.deepcopy(NAMED_SHAPES[name])


def named_shape_arch(name: str) -> ModelArch:
    """The `ModelArch` of a published shape."""
    return ModelArch.from_hf_config(named_shape_config(name))
