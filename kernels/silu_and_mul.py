"""silu(gate) * up of the fused gate/up projection, in one Triton launch.

Reference: `silu_and_mul_ref` below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:  # [N, 2I] -> [N, I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [N, 2I]
    out_ptr,  # [N, I]
    stride_in,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)  # rounded like F.silu
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul_ref` in one launch; gate_up [N, 2I] (last dim contiguous) -> [N, I]."""
    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1, "gate_up must be [N, 2I], row-contiguous"
    n, two_inter = gate_up.shape
    assert two_inter % 2 == 0, f"gate_up's last dim must be even, got {two_inter}"
    inter = two_inter // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if n:
        _silu_and_mul_kernel[(n, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block
        )
    return out
