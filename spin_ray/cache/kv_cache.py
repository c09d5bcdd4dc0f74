"""Paged KV storage: one K and one V tensor of pages per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheShape:
    """Geometry of the paged KV storage."""

    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """K + V bytes one token takes across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class KVCache:
    """`k[layer]` and `v[layer]` are [num_pages, page_size, num_kv_heads, head_dim] tensors."""

    def __init__(self, shape: KVCacheShape, dtype: torch.dtype, device: str | torch.device):
        self.shape = shape
        page_shape = (shape.num_pages, shape.page_size, shape.num_kv_heads, shape.head_dim)
        self.k = [
            torch.zeros(page_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)
        ]
        self.v = [
            torch.zeros(page_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)
        ]
