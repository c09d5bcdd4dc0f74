"""Rotary position embedding in Hugging Face Llama's rotate-half convention, with Llama 3.1's
long-context frequency scaling.

Angles are computed in fp32 for exactly the positions of the batch (`position * inv_freq`, the
same values as transformers): no table to size or grow, no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spin_ray.kernels.rope import rope_, rope_ref


@dataclass(frozen=True)
class Llama3RopeScaling:
    """`rope_scaling` of type "llama3" (Llama 3.1/3.2/3.3)."""

    factor: float
    """Low frequencies (long wavelengths) are divided by this."""
    low_freq_factor: float
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""
    high_freq_factor: float
    """Wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int
    """Context length of pre-training before the long-context extension."""

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor: must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling: need 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings < 1:
            raise ValueError("rope_scaling.original_max_position_embeddings: must be >= 1")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None
) -> torch.Tensor:  # [D/2] fp32 on the CPU
    """Inverse frequency of each rotated pair of dimensions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [D/2]
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(
        wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq
    )
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= old_len / scaling.high_freq_factor) & (
        wavelen <= old_len / scaling.low_freq_factor
    )
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Rotates q and k by their positions: the fused Triton kernel on CUDA (in place), its
    torch reference (`spin_ray.kernels.rope.rope_ref`) elsewhere."""

    def __init__(self, head_dim: int, theta: float, scaling: Llama3RopeScaling | None):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2] fp32

    def rotate(
        self,
        x: torch.Tensor,  # [N, H, D]
        positions: torch.Tensor,  # [N] int
    ) -> torch.Tensor:  # [N, H, D]
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        if x.is_cuda:
            return rope_(x, positions, self.inv_freq)
        return rope_ref(x, positions, self.inv_freq)
