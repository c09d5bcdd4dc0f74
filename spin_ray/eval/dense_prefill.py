"""One dense prefill of a prompt outside the engine, keeping every layer's K/V as a `PromptKV`:
computed once per prompt, then handed to the engine of every setting under test, which only
decodes (prefill is dense in every mode, so nothing it measures changes)."""

from __future__ import annotations

from spin_ray.attention.whole_sequence import capture_layers
from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.models.llama import CausalLM


def dense_prompt_kv(model: CausalLM, token_ids: list[int]) -> PromptKV:
    """The K/V of every layer over `token_ids` (one forward, no logits)."""
    kept = capture_layers(model, token_ids, keep=("k", "v"))
    return PromptKV(k=tuple(kept["k"]), v=tuple(kept["v"]))
