"""One dense prefill of a prompt outside the engine, keeping every layer's K/V as a `PromptKV`:
computed once per prompt, then handed to the engine of every setting under test, which only
decodes (prefill is dense in every mode, so nothing it measures changes)."""

from __future__ import annotations

import torch

from spin_ray.attention.backend import AttentionBackend
from spin_ray.engine.prompt_kv import PromptKV
from spin_ray.kernels.paged_attention_ref import prefill_attention_ref
from spin_ray.models.llama import CausalLM


class CapturingBackend(AttentionBackend):
    """Causal attention of one whole prompt (no cache), keeping each layer's K/V."""

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def plan(self, meta) -> None:
        return None

    def forward(self, layer_idx, q, k, v, scale):  # [T, Hq, D], [T, Hkv, D] x 2
        self.k.append(k.clone())
        self.v.append(v.clone())
        ctx_k, ctx_v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, D]
        if q.is_cuda:
            from spin_ray.kernels.paged_prefill_attention import prefill_attention

            return prefill_attention(q, ctx_k, ctx_v, scale)
        return prefill_attention_ref(q, ctx_k, ctx_v, scale)


@torch.inference_mode()
def dense_prompt_kv(model: CausalLM, token_ids: list[int]) -> PromptKV:
    """The K/V of every layer over `token_ids` (one forward, no logits)."""
    device = model.model.embed_tokens.weight.device
    backend = CapturingBackend()
    model.backend = backend
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)  # [T]
    model(ids, torch.arange(len(token_ids), device=device))
    model.backend = None
    return PromptKV(k=tuple(backend.k), v=tuple(backend.v))
