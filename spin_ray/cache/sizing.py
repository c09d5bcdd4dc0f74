"""How many KV pages fit: from free GPU memory after the weights, or a fixed CPU budget."""

from __future__ import annotations

import torch

from spin_ray.cache.config import CacheConfig


def activation_reserve_bytes(
    num_batched_tokens: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    max_num_seqs: int,
    dtype: torch.dtype,
) -> int:
    """Generous estimate of the peak activation memory of one step: a few hidden-sized and
    MLP-sized buffers per batched token, plus fp32 logits for every sampled row."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = (6 * hidden_size + 3 * intermediate_size) * itemsize
    return 2 * num_batched_tokens * per_token + 3 * max_num_seqs * vocab_size * 4


def num_kv_pages(
    config: CacheConfig, device: str, bytes_per_token: int, activation_reserve: int
) -> int:
    """Pages the pool gets: `config.num_pages` if set; on CPU `cpu_kv_tokens / page_size`; on
    CUDA what remains of `gpu_memory_utilization × total` after what is allocated now and the
    activation reserve."""
    if config.num_pages is not None:
        return config.num_pages
    if not device.startswith("cuda"):
        return config.cpu_kv_tokens // config.page_size
    pages = gpu_kv_budget_bytes(device, config.gpu_memory_utilization, activation_reserve) // (
        bytes_per_token * config.page_size
    )
    if pages < 1:
        raise ValueError(
            "gpu_memory_utilization: no memory left for the KV cache after the weights; raise "
            "it or use a smaller model"
        )
    return pages


def gpu_kv_budget_bytes(device: str | torch.device, utilization: float, reserve: int) -> int:
    """Bytes the KV cache may take on a CUDA device: `utilization × total`, less what is
    allocated now and `reserve` (weights not yet loaded, activations); may be <= 0."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total * utilization) - (total - free) - reserve
