"""The fused per-token kernels (RMSNorm, add + RMSNorm, RoPE, SiLU-and-mul) against their torch
references, on the CPU with Triton's interpreter (conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from spin_ray.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from spin_ray.kernels.rope import rope_, rope_ref
from spin_ray.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from spin_ray.models.rope import Llama3RopeScaling, rope_inv_freq

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96])  # 96: not a power of two, the block is masked
def test_rms_norm_matches_reference(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)
    assert rel_err(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference_and_updates_the_residual(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 80, generator=g).to(dtype)
    residual = torch.randn(5, 80, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(80, generator=g)).to(dtype)
    ref_out, ref_sum = add_rms_norm_ref(x, residual.clone(), w, 1e-6)
    out, new_residual = add_rms_norm(x, residual, w, 1e-6)
    assert new_residual is residual
    assert rel_err(residual, ref_sum) < TOL[dtype]
    assert rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,head_dim", [(4, 32), (3, 16)])
def test_rope_matches_reference(dtype, num_heads, head_dim):
    g = torch.Generator().manual_seed(num_heads * head_dim)
    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 32)
    inv_freq = rope_inv_freq(head_dim, 500000.0, scaling)
    positions = torch.randint(0, 5000, (9,), generator=g)
    x = torch.randn(9, num_heads, head_dim, generator=g).to(dtype)
    ref = rope_ref(x, positions, inv_freq)
    # a strided view, like q inside the fused qkv projection output
    qkv = torch.randn(9, num_heads * head_dim * 2, generator=g).to(dtype)
    view = qkv[:, : num_heads * head_dim].view(9, num_heads, head_dim)
    view.copy_(x)
    rope_(view, positions, inv_freq)
    assert rel_err(view, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [48, 1500])  # 1500: two column blocks, the last masked
def test_silu_and_mul_matches_reference(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(6, 2 * inter, generator=g).to(dtype)
    assert rel_err(silu_and_mul(gate_up), silu_and_mul_ref(gate_up)) < TOL[dtype]


def test_empty_batches_launch_nothing():
    w = torch.ones(8)
    assert rms_norm(torch.empty(0, 8), w, 1e-5).shape == (0, 8)
    assert silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    assert rope_(torch.empty(0, 2, 8), torch.empty(0, dtype=torch.long), torch.ones(4)).shape == (
        0,
        2,
        8,
    )
