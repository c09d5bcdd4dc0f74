"""Rotary position embedding of q and k in one Triton launch (the torch version costs about
nine small ops per tensor). Rotate-half convention, angles position × inv_freq in fp32.

Reference: `rope_ref` below (the same arithmetic as spin_ray.models.rope.apply_rope).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_ref(
    x: torch.Tensor,  # [N, H, D]
    positions: torch.Tensor,  # [N] int
    inv_freq: torch.Tensor,  # [D/2] fp32
) -> torch.Tensor:  # [N, H, D]
    """Rotate the pairs (x[..., i], x[..., i + D/2]) by positions × inv_freq[i], in fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]  # [N, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)  # [N, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@triton.jit
def _rope_kernel(
    x_ptr,  # [N, H, D], rotated in place
    positions_ptr,  # [N]
    inv_freq_ptr,  # [D/2] fp32
    stride_n,
    stride_h,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (offs_h < num_heads)[:, None] & mask_d[None, :]
    pos = tl.load(positions_ptr + token).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + offs_d, mask=mask_d, other=0.0)  # [BLOCK_HALF]
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    base = x_ptr + token * stride_n + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(base, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def rope_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`rope_ref` computed in place on x [N, H, D] (last dim contiguous); returns x."""
    assert x.dim() == 3 and x.stride(-1) == 1, (
        f"x must be [N, H, D] with contiguous D, got {x.shape}"
    )
    n, num_heads, head_dim = x.shape
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    assert positions.shape == (n,), f"positions must be [{n}], got {tuple(positions.shape)}"
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32
    if n:
        _rope_kernel[(n,)](
            x,
            positions,
            inv_freq,
            x.stride(0),
            x.stride(1),
            num_heads,
            HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )
    return x
