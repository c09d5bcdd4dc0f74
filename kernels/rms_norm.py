"""RMSNorm, optionally fused with the residual add before it, in Triton: one launch instead of
the eight small ops of the torch version (decode steps are launch-bound on the GPU).

References: `rms_norm_ref` and `add_rms_norm_ref` below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(
    x: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [N, H]
    """x / rms(x) * weight, normalised in fp32 (transformers' LlamaRMSNorm)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor,  # [N, H]
    residual: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, H] normed, [N, H] new residual)
    """s = x + residual (in x's dtype); returns (rms_norm(s), s)."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [N, H]
    residual_ptr,  # [N, H] (read and overwritten with x + residual when HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [N, H]
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded as torch
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty)  # rounded to x's dtype, as the reference
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [N, H] row-contiguous, got {x.shape}"
    assert weight.shape == (x.shape[1],) and weight.is_contiguous(), "weight must be [H]"
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_ref` in one launch; x [N, H] -> [N, H]."""
    _check(x, weight)
    out = torch.empty_like(x)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x,
            x,
            weight,
            out,
            x.stride(0),
            x.stride(0),
            out.stride(0),
            x.shape[1],
            eps,
            HAS_RESIDUAL=False,
            BLOCK=triton.next_power_of_2(x.shape[1]),
        )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm_ref` in one launch; `residual` is updated in place to x + residual and
    returned as the second value."""
    _check(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
    assert residual.stride(-1) == 1, "residual must be row-contiguous"
    out = torch.empty_like(x)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x,
            residual,
            weight,
            out,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            x.shape[1],
            eps,
            HAS_RESIDUAL=True,
            BLOCK=triton.next_power_of_2(x.shape[1]),
        )
    return out, residual
