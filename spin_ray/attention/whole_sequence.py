"""Causal attention over one whole sequence with no cache, keeping each layer's tensors: for
work outside the engine that reads what every layer computed over a text (the accuracy sweep's
prompt K/V, the Seer gate's queries and keys)."""

from __future__ import annotations

import torch

from spin_ray.attention.backend import AttentionBackend
from spin_ray.kernels.paged_attention_ref import prefill_attention_ref


class WholeSequenceCapture(AttentionBackend):
    """Each layer's q, k and/or v (after RoPE, as the model hands them over), in layer order."""

    def __init__(self, keep: tuple[str, ...]):
        if not keep or set(keep) - {"q", "k", "v"}:
            raise ValueError(f"keep: name some of q, k and v, got {keep}")
        self.kept: dict[str, list[torch.Tensor]] = {name: [] for name in keep}

    def plan(self, meta) -> None:
        return None

    def forward(self, layer_idx, q, k, v, scale):  # [T, Hq, D], [T, Hkv, D] x 2
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if name in self.kept:
                self.kept[name].append(tensor.clone())
        ctx_k, ctx_v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, D]
        if q.is_cuda:
            from spin_ray.kernels.paged_prefill_attention import prefill_attention

            return prefill_attention(q, ctx_k, ctx_v, scale)
        return prefill_attention_ref(q, ctx_k, ctx_v, scale)


@torch.inference_mode()
def capture_layers(
    model: torch.nn.Module, token_ids: list[int], keep: tuple[str, ...]
) -> dict[str, list[torch.Tensor]]:
    """One forward of a `CausalLM` (spin_ray/models/llama.py) over `token_ids` from position 0,
    no logits: each layer's `keep` tensors ([T, H, D] each, in layer order)."""
    device = next(model.parameters()).device
    backend = WholeSequenceCapture(keep)
    model.backend = backend
    ids = torch.tensor(token_ids, dtype=torch.int64, device=device)  # [T]
    try:
        model(ids, torch.arange(len(token_ids), device=device))
    finally:
        model.backend = None
    return backend.kept
