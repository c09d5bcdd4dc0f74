"""Frozen configuration dataclasses for the engine. Derived values make a new config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from spin_ray.cache.config import CacheConfig
from spin_ray.sparse.config import SparseConfig

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """Map a user dtype ("auto", "bf16", torch.float16, ...) to a torch dtype valid on `device`."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device == "cpu" and resolved == torch.float16:
        raise ValueError("dtype: float16 is not supported on the CPU; use float32 or bfloat16")
    return resolved


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" where a GPU is visible, else "cpu"; check the rest."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but no CUDA GPU is visible")
        return device
    if device != "cpu":
        raise ValueError(f"device: unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


DEFAULT_CHUNK_TOKENS = 8192
"""`SchedulerConfig.max_num_batched_tokens` when unset and prefill is chunked."""

WARMUP_OUTPUT_TOKENS = (4, 8)
"""Tokens each of the two warm-up requests decodes (`LLMEngine.warm_up`, the bench's warm-up):
decode batches of 2, then of 1."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits. `None` fields are derived by the engine once the model and
    the KV cache size are known (`resolved`)."""

    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int | None = None
    """Most tokens (prefill chunks + decodes) computed in one step; None: 8192 with chunked
    prefill, else max_model_len."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None: the model's limit, capped by the KV cache."""
    enable_chunked_prefill: bool = True
    """Split prompts longer than the step budget across steps; if False a prompt runs whole."""
    admission_reserve_tokens: int | None = None
    """Tokens of a step's budget that running prompts' chunks leave free while a waiting
    request could be admitted, so that short requests are not held behind a long prefill;
    None: an eighth of `max_num_batched_tokens` (0 with chunked prefill off)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.admission_reserve_tokens is not None and self.admission_reserve_tokens < 0:
            raise ValueError(
                f"admission_reserve_tokens: must be >= 0, got {self.admission_reserve_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if (
            not self.enable_chunked_prefill
            and self.max_num_batched_tokens is not None
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                "max_num_batched_tokens: must be >= max_model_len when chunked prefill is off "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )

    def resolved(self, model_limit: int, kv_capacity_tokens: int) -> SchedulerConfig:
        """A copy with every None filled in; raises if max_model_len exceeds either limit."""
        max_model_len = self.max_model_len or min(model_limit, kv_capacity_tokens)
        if max_model_len > model_limit:
            raise ValueError(
                f"max_model_len: {max_model_len} exceeds the model's limit ({model_limit})"
            )
        if max_model_len > kv_capacity_tokens:
            raise ValueError(
                f"max_model_len: {max_model_len} tokens do not fit the KV cache "
                f"({kv_capacity_tokens} tokens); lower max_model_len or give the cache more memory"
            )
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = DEFAULT_CHUNK_TOKENS if self.enable_chunked_prefill else max_model_len
        reserve = self.admission_reserve_tokens
        if reserve is None:
            reserve = batched // 8 if self.enable_chunked_prefill else 0
        if reserve >= batched:
            raise ValueError(
                f"admission_reserve_tokens: {reserve} leaves no budget for running prompts "
                f"(max_num_batched_tokens {batched})"
            )
        return replace(
            self,
            max_model_len=max_model_len,
            max_num_batched_tokens=batched,
            admission_reserve_tokens=reserve,
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built once by `LLM` from its keyword arguments."""

    model: str
    """Checkpoint folder, .gguf file, hub id, `smollm2-135m` or `spin-tiny`."""
    device: str = "cpu"
    """cpu or cuda[:N]; as an option also auto (cuda where a GPU is visible, else cpu)."""
    dtype: torch.dtype = torch.float32
    """Dtype of weights, activations and KV; as an option a name: auto (bfloat16 on CUDA,
    float32 on the CPU), float32, bfloat16 or float16."""
    seed: int = 0
    """Seed for requests that carry no seed of their own."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer: str | None = None
    """Tokenizer folder or hub id; defaults to `model`."""
    sparse: SparseConfig | None = None
    """Sparse attention over a two-tier KV cache (spin_ray.sparse); None: dense, all KV in HBM."""
    enforce_eager: bool = False
    """Run every step eagerly. Otherwise, on CUDA, decode-only steps replay CUDA graphs
    captured per padded batch size (engine/decode_graphs.py); the CPU always runs eagerly."""
    async_scheduling: bool = True
    """Schedule and launch each step before reading the previous step's tokens (vLLM's async
    scheduling): the GPU runs while the host detokenizes the previous step's tokens and plans
    the next step; `LLMEngine.step` then returns each step's outputs one call later. The
    tokens are the same either way."""
    kv_stats_interval_s: float = 1.0
    """Least time between the cache snapshots handed to stat loggers (metrics): a snapshot
    reads counters kept on the device, so it waits for the GPU."""

    def __post_init__(self) -> None:
        if self.kv_stats_interval_s < 0:
            raise ValueError(f"kv_stats_interval_s: must be >= 0, got {self.kv_stats_interval_s}")
        if not self.model:
            raise ValueError("model: must name a checkpoint folder, hub id or 'spin-tiny'")
