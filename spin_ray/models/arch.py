"""The shape of a Llama-family decoder, read from a Hugging Face `config.json`.

One frozen `ModelArch` describes every supported family (Llama 3.x, Qwen2/2.5, Qwen3, Mistral):
the decoder code reads only these fields, never the raw config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from spin_ray.models.rope import Llama3RopeScaling

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
"""Supported `architectures` entries and the `model_type` each goes with."""


@dataclass(frozen=True)
class ModelArch:
    """Sizes and per-family switches of a decoder-only Llama-family model."""

    model_type: str
    """One of "llama", "qwen2", "qwen3", "mistral"."""
    hidden_size: int
    """Width of the residual stream (H)."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads (Hq)."""
    num_kv_heads: int
    """Key/value heads (Hkv); Hq is a multiple of it (GQA when smaller)."""
    head_dim: int
    """Per-head size (D); Qwen3 sets it explicitly, others default to H // Hq."""
    intermediate_size: int
    """Width of the gated MLP."""
    vocab_size: int
    """Rows of the embedding and of the LM head (V)."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: Llama3RopeScaling | None
    """Llama 3.1's long-context frequency scaling, or None for plain RoPE."""
    max_position_embeddings: int
    """Longest context the checkpoint was trained for."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2/2.5; Llama and Qwen3 when `attention_bias` is set)."""
    output_bias: bool = False
    """The attention output projection carries a bias (Llama/Qwen3 with `attention_bias`)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    tie_word_embeddings: bool = False
    """The LM head reuses the input embedding matrix."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (config.json and generation_config.json together)."""
    sliding_window: int | None = None
    """Attention window of the checkpoint (Mistral v0.1, Qwen with `use_sliding_window`); the
    dense engine serves such a model only up to this length."""

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES.values():
            raise ValueError(f"model_type: unsupported {self.model_type!r}")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide "
                f"num_attention_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps / rope_theta: must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window: must be >= 1 or None, got {self.sliding_window}")

    @classmethod
    def from_hf_config(cls, cfg: dict, generation_config: dict | None = None) -> ModelArch:
        """Read a Hugging Face `config.json` dict (either the hub's `rope_theta`/`rope_scaling`
        keys or transformers 5's `rope_parameters`), plus `generation_config.json` for EOS ids."""
        model_type = _model_type(cfg)
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: only silu is supported, got {cfg['hidden_act']!r}")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias: MLP biases are not supported")
        rope = _rope_parameters(cfg)
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor: only full-width RoPE is supported")
        bias = bool(cfg.get("attention_bias", False))
        eos = list(_ids(cfg.get("eos_token_id")))
        eos += _ids((generation_config or {}).get("eos_token_id"))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(rope),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            attention_bias=model_type == "qwen2" or (model_type != "mistral" and bias),
            output_bias=model_type in ("llama", "qwen3") and bias,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            sliding_window=_sliding_window(cfg, model_type),
        )

    @property
    def q_size(self) -> int:
        """Width of all query heads together (Hq * D)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of all key (or value) heads together (Hkv * D)."""
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Weights of the model, counted from the shapes (nothing allocated)."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) * self.attention_bias + h * self.output_bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h


def _model_type(cfg: dict) -> str:
    architectures = cfg.get("architectures") or []
    if architectures:
        arch = architectures[0]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"architectures: unsupported architecture {arch!r}; spin-ray supports "
                f"{', '.join(ARCHITECTURES)}"
            )
        return ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES.values():
        raise ValueError(
            f"model_type: unsupported model type {model_type!r}; spin-ray supports "
            f"{', '.join(ARCHITECTURES.values())}"
        )
    return model_type


def _rope_parameters(cfg: dict) -> dict:
    """One flat dict of RoPE settings, from either config format."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        params.setdefault("rope_theta", cfg["rope_theta"])
    return params


def _rope_scaling(rope: dict) -> Llama3RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"rope_scaling: unsupported RoPE scaling type {rope_type!r}; "
            "spin-ray supports 'default' and 'llama3'"
        )
    return Llama3RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _sliding_window(cfg: dict, model_type: str) -> int | None:
    if model_type == "mistral" or cfg.get("use_sliding_window", False):
        return cfg.get("sliding_window")
    return None


def _ids(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return list(value)
