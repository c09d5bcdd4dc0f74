"""Prompt KV computed outside the engine (disaggregated prefill, as vLLM's KV connectors): the
post-RoPE keys and values of a prompt's first tokens, handed to `LLMEngine.add_request`. The
engine stores them into the request's pages when it is admitted and computes only the prompt's
remaining tokens (at least the last one, whose logits give the first output token), so one
dense prefill can serve many engines (`spin-ray eval` runs every sparse setting on the same
prompts this way). A remainder of one token runs as a decode step (sparse engines attend it
sparsely); longer ones as a prefill chunk over the imported prefix (dense)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptKV:
    """Per layer, the K and V of a prompt's first `num_tokens` tokens."""

    k: tuple[torch.Tensor, ...]
    """Per layer [T, Hkv, D]: post-RoPE keys of positions 0..T-1."""
    v: tuple[torch.Tensor, ...]
    """Per layer [T, Hkv, D]: values."""

    def __post_init__(self) -> None:
        if not self.k or len(self.k) != len(self.v):
            raise ValueError(f"prompt_kv: {len(self.k)} key and {len(self.v)} value layers")
        shape = self.k[0].shape
        if len(shape) != 3 or shape[0] < 1:
            raise ValueError(f"prompt_kv: layers must be [T >= 1, Hkv, D], got {tuple(shape)}")
        if any(t.shape != shape for t in (*self.k, *self.v)):
            raise ValueError("prompt_kv: every layer's K and V must have the same shape")

    @property
    def num_tokens(self) -> int:
        return self.k[0].shape[0]

    def check_fits(self, num_layers: int, num_kv_heads: int, head_dim: int, prompt_len: int):
        """Raise ValueError naming `prompt_kv` unless it fits the model and leaves at least the
        prompt's last token to compute."""
        if len(self.k) != num_layers or self.k[0].shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(
                f"prompt_kv: {len(self.k)} layers of [T, {self.k[0].shape[1]}, "
                f"{self.k[0].shape[2]}], the model has {num_layers} of [T, {num_kv_heads}, "
                f"{head_dim}]"
            )
        if self.num_tokens >= prompt_len:
            raise ValueError(
                f"prompt_kv: covers {self.num_tokens} tokens of a {prompt_len}-token prompt; "
                "the last prompt token must be left to compute"
            )
