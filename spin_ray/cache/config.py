"""The paged KV cache's configuration (a field of `EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache layout."""

    page_size: int = 16
    """Tokens per KV page."""
    num_pages: int | None = None
    """Pages in the pool; None sizes it from `gpu_memory_utilization` (GPU) or `cpu_kv_tokens`."""
    gpu_memory_utilization: float = 0.90
    """Fraction of GPU memory the engine may use in all (weights + activations + KV)."""
    cpu_kv_tokens: int = 65536
    """KV capacity in tokens when running on the CPU and `num_pages` is None."""

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size: must be a power of two >= 1, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages: must be >= 1, got {self.num_pages}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_tokens < self.page_size:
            raise ValueError(f"cpu_kv_tokens: must be >= page_size, got {self.cpu_kv_tokens}")
