"""One dense prefill of a prompt outside the engine, keeping every layer's K/V as a `PromptKV`:
computed once per prompt, then handed to the engine of every setting under test, which only
decodes (prefill is dense in every mode, so nothing it measures changes)."""

from __future__ import annotations

import torch

from spin_ray.attention.whole_sequence import WholeSequenceCapture
from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.models.llama import CausalLM


@torch.inference_mode()
def dense_prompt_kv(model: CausalLM, token_ids: list[int]) -> PromptKV:
    """The K/V of every layer over `token_ids` (one forward, no logits)."""
    device = model.model.embed_tokens.weight.device
    backend = WholeSequenceCapture(keep=("k", "v"))
    model.backend = backend
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)  # [T]
    model(ids, torch.arange(len(token_ids), device=device))
    model.backend = None
    return PromptKV(k=tuple(backend.kept["k"]), v=tuple(backend.kept["v"]))
