"""One decoder for the Llama family (Llama 3.x, Qwen2/2.5, Qwen3, Mistral), switched by `ModelArch`.

Tokens of many sequences arrive packed into one flat batch of N tokens; everything but attention
is per token, and attention is the backend's job (it owns the paged KV cache), so the model
knows nothing of sequences, pages or sparsity. Parameter names follow Hugging Face's, except
that q/k/v and gate/up are fused into `qkv_proj` and `gate_up_proj`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spin_ray.attention.backend import AttentionBackend
from spin_ray.models.arch import ModelArch
from spin_ray.models.rope import RotaryEmbedding, apply_rope


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 like transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int):
        super().__init__()
        self.arch = arch
        self.layer_idx = layer_idx
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.attention_bias
        )
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=arch.output_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        cos: torch.Tensor,  # [N, D/2]
        sin: torch.Tensor,  # [N, D/2]
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [N, H]
        a = self.arch
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(n, a.num_heads, a.head_dim)  # [N, Hq, D]
        k = k.view(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
        v = v.view(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend.forward(self.layer_idx, q, k, v, self.scale)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, a.q_size))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, arch: ModelArch):
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # [N, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch)

    def forward(self, h, cos, sin, backend):  # h: [N, H] -> [N, H]
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """Embedding, layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, arch: ModelArch):
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class CausalLM(nn.Module):
    """A Llama-family decoder-only LM over packed tokens.

    `backend` may be attached after construction (`model.backend = ...`), e.g. once the KV
    cache has been sized from the memory the weights left free; the runner calls
    `backend.plan(meta)` before each `forward`.
    """

    def __init__(self, arch: ModelArch, backend: AttentionBackend | None = None):
        super().__init__()
        self.arch = arch
        self.backend = backend
        self.model = DecoderStack(arch)
        self.lm_head = (
            None
            if arch.tie_word_embeddings
            else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )
        self.rope = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int  tokens of all sequences, packed
        positions: torch.Tensor,  # [N] int  position of each token in its sequence
    ) -> torch.Tensor:  # [N, H]  final-normed hidden states
        assert self.backend is not None, "attach an attention backend before forward()"
        cos, sin = self.rope.cos_sin(positions)  # [N, D/2] each
        h = self.model.embed_tokens(input_ids)  # [N, H]
        for layer in self.model.layers:
            h = layer(h, cos, sin, self.backend)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [M, H] -> [M, V] fp32
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
