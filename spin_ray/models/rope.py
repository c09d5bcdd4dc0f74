"""Rotary position embedding in Hugging Face Llama's rotate-half convention, with Llama 3.1's
long-context frequency scaling.

cos/sin are computed in fp32 for exactly the positions of the batch, once per forward pass and
shared by all layers: no table to size or grow, no host sync, and the same values as
transformers (`position * inv_freq` in fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    """Holds the inverse frequencies (fp32, moved once to the device of the first batch)."""

    def __init__(self, head_dim: int, theta: float, scaling: Llama3RopeScaling | None):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2]

    def cos_sin(
        self,
        positions: torch.Tensor,  # [N] int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ([N, D/2], [N, D/2]) fp32
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, D/2]
        return freqs.cos(), freqs.sin()


def apply_rope(
    x: torch.Tensor,  # [N, H, D]
    cos: torch.Tensor,  # [N, D/2] fp32
    sin: torch.Tensor,  # [N, D/2] fp32
) -> torch.Tensor:  # [N, H, D]
    """Rotate the pairs (x[..., i], x[..., i + D/2]) by position-dependent angles (in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [N, H, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, D/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
