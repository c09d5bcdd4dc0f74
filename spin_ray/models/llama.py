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
from spin_ray.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from spin_ray.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from spin_ray.models.arch import ModelArch
from spin_ray.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 like transformers' LlamaRMSNorm; on CUDA one
    fused Triton launch (with the residual add before it, for `add_forward`)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, size]
        if x.is_cuda:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [N, size] each
        """(norm(x + residual), x + residual); on CUDA `residual` is updated in place."""
        if x.is_cuda:
            return add_rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm_ref(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, rope: RotaryEmbedding):
        super().__init__()
        self.arch = arch
        self.layer_idx = layer_idx
        self.rope = rope
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
        positions: torch.Tensor,  # [N]
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [N, H]
        a = self.arch
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q = q.view(n, a.num_heads, a.head_dim)  # [N, Hq, D]
        k = k.view(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
        v = v.view(n, a.num_kv_heads, a.head_dim)  # [N, Hkv, D]
        if a.qk_norm:  # per head: [N * H, D] rows
            k = self.k_norm(k.reshape(-1, a.head_dim)).view(n, a.num_kv_heads, a.head_dim)
        q, k = self._position_query(q, positions), self.rope.rotate(k, positions)
        out = backend.forward(self.layer_idx, q, k, v, self.scale)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, a.q_size))

    def query(
        self,
        x: torch.Tensor,  # [M, H] normed hidden states
        positions: torch.Tensor,  # [M]
    ) -> torch.Tensor:  # [M, Hq, D] post-RoPE queries alone (no K/V)
        a = self.arch
        weight = self.qkv_proj.weight[: a.q_size]
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[: a.q_size]
        q = F.linear(x, weight, bias).view(-1, a.num_heads, a.head_dim)
        return self._position_query(q, positions)

    def _position_query(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q_norm (per head, where the model has it), then RoPE: [M, Hq, D] → [M, Hq, D]."""
        if self.arch.qk_norm:
            q = self.q_norm(q.reshape(-1, self.arch.head_dim)).view(q.shape)
        return self.rope.rotate(q, positions)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, arch: ModelArch):
        super().__init__()
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        gate_up = self.gate_up_proj(x)  # [N, 2I]
        act = silu_and_mul(gate_up) if gate_up.is_cuda else silu_and_mul_ref(gate_up)  # [N, I]
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer_idx, rope)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch)

    def forward(
        self,
        h: torch.Tensor,  # [N, H] the previous layer's output (not yet added to the residual)
        residual: torch.Tensor | None,  # [N, H] the residual stream so far; None: first layer
        positions: torch.Tensor,  # [N]
        backend: AttentionBackend,
        ahead: tuple[DecoderLayer, torch.Tensor] | None = None,  # next layer, rows [M]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, H] this layer's output, [N, H] residual)
        """The usual h + attn(norm(h)), h + mlp(norm(h)), with each residual add fused into
        the norm after it. With `ahead`, first hand the backend the next layer's queries of
        those rows predicted from this layer's input (`AttentionBackend.prefetch`)."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm.add_forward(h, residual)
        if ahead is not None:
            layer, rows = ahead
            backend.prefetch(
                layer.self_attn.layer_idx, layer.predict_query(residual[rows], positions[rows])
            )
        h = self.self_attn(x, positions, backend)
        x, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(x), residual

    def predict_query(
        self,
        h: torch.Tensor,  # [M, H] the residual stream entering the layer before this one
        positions: torch.Tensor,  # [M]
    ) -> torch.Tensor:  # [M, Hq, D]
        """This layer's queries as if `h` entered it: consecutive layers' inputs differ by one
        layer's update, so they select mostly the same pages (InfiniGen's observation)."""
        return self.self_attn.query(self.input_layernorm(h), positions)


class DecoderStack(nn.Module):
    """Embedding, layers and final norm (Hugging Face's `model.` prefix)."""

    def __init__(self, arch: ModelArch, rope: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, rope) for i in range(arch.num_layers))
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
        self.rope = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        self.model = DecoderStack(arch, self.rope)
        self.lm_head = (
            None
            if arch.tie_word_embeddings
            else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int  tokens of all sequences, packed
        positions: torch.Tensor,  # [N] int  position of each token in its sequence
    ) -> torch.Tensor:  # [N, H]  final-normed hidden states
        assert self.backend is not None, "attach an attention backend before forward()"
        h = self.model.embed_tokens(input_ids)  # [N, H]
        residual = None
        layers = self.model.layers
        for i, layer in enumerate(layers):
            rows = self.backend.lookahead_rows(i + 1) if i + 1 < len(layers) else None
            ahead = None if rows is None else (layers[i + 1], rows)
            h, residual = layer(h, residual, positions, self.backend, ahead)
        return self.model.norm.add_forward(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [M, H] -> [M, V] fp32
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
