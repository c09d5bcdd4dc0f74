"""What one `spin-ray bench` run measures: engine settings, modes, workload and request rates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from spin_ray.bench.workloads import WorkloadSpec
from spin_ray.sparse.config import SparseConfig, sparse_config_from_args

SPIN_MODES = ("dense", "dense-offload", "sparse-naive", "spin")
"""spin-ray's own modes, one engine each (issue 3)."""
MODES = SPIN_MODES + ("vllm",)
"""Every mode the benchmark knows; `vllm` drives real vLLM where it is installed."""
SPARSE_ALGORITHMS = ("quest", "shadowkv", "retroinfer", "seer")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: every mode runs every request rate on the same requests."""

    model: str = "spin-tiny"
    """Checkpoint folder, hub id, `spin-tiny`, or a named random-weight shape."""
    workload: WorkloadSpec = field(
        default_factory=lambda: WorkloadSpec(input_len=64, output_len=16)
    )
    """Which requests to send."""
    modes: tuple[str, ...] = ("dense",)
    """Modes to run, in order, one engine at a time."""
    request_rates: tuple[float, ...] = (math.inf,)
    """Poisson arrival rates in requests/s; inf sends every request at once (offline)."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    sparse: str = "quest"
    """Sparse algorithm of the `sparse-naive` and `spin` modes."""
    token_budget: int | float | None = None
    """Selected tokens per step (int) or fraction of the context (float); None: the default."""
    buffer_ratio: float | None = None
    """HBM buffer pages per mandatory page in `spin` mode; None: the default."""
    min_buffer_ratio: float | None = None
    """The buffer (per mandatory page) every running `spin` request keeps under HBM pressure;
    admission needs it, so it bounds spin's batch by HBM; None: the default."""
    lookahead: bool = False
    """`spin` mode fetches each layer's pages one layer early (`SparseConfig.lookahead`)."""
    lookahead_share: float | None = None
    """The share of the top-k that lookahead fetches early; None: the default."""
    gpu_cache_tokens: int | None = None
    """HBM KV capacity in tokens of every layer's KV, the same for every spin-ray mode: the KV
    pool of `dense` (`num_pages`), the working-set slots of the tiered modes (`spin`: less its
    dense layers' KV, see `cache_kwargs`); None: from free memory."""
    cpu_cache_tokens: int | None = None
    """CPU-tier KV capacity in tokens for the offloading modes; None: from free memory."""
    max_num_seqs: int = 64
    """Most requests running at once (same for every mode)."""
    max_num_batched_tokens: int | None = None
    """Most tokens per step; None: the engine's default."""
    max_model_len: int | None = None
    """Longest sequence; None: the longest request of the workload."""
    page_size: int = 16
    """Tokens per KV page."""
    seed: int = 0
    """Seed of the workload and of the engines."""
    enforce_eager: bool = False
    """Run every step eagerly (spin-ray and vLLM alike). Otherwise, on CUDA, decode-only steps
    replay CUDA graphs, and spin-ray's cache phases (select, fetch, index, attention) go
    untimed: their time shares are None."""
    async_scheduling: bool = True
    """spin-ray launches each step before reading the previous step's tokens
    (`EngineConfig.async_scheduling`); False waits for each step."""
    burstiness: float = 1.0
    """Shape of the Gamma inter-arrival times at a finite rate (`vllm bench serve`'s): 1 is
    Poisson, below 1 burstier, above 1 more even; the mean rate stays the request rate."""
    max_concurrency: int | None = None
    """Requests in flight at most (a due request waits for one to finish; its TTFT counts
    from when it is sent, as `vllm bench serve` counts it); None: no limit."""
    metrics_port: int | None = None
    """Serve every spin-ray engine's Prometheus metrics at http://127.0.0.1:<port>/metrics
    while it runs (series told apart by their `mode` label); None: none."""
    time_limit: float | None = None
    """Seconds one mode may run at one rate; past it, unfinished requests are aborted and the
    result is marked truncated. None: no limit."""
    repeats: int = 1
    """Runs of every mode at every rate (one engine, warmed up once), each reported; the
    comparisons come per run and as medians over the runs (a machine's noise, not the
    modes', moves single runs)."""
    warmup: bool = True
    """Run two short requests through each engine before timing (compilation, graph capture)."""
    progress: bool = True
    """Show a progress bar while each mode runs."""

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("modes: name at least one mode")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"modes: unknown mode {mode!r}; use {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes: a mode is named twice in {self.modes}")
        if "vllm" in self.modes and self.device.startswith("cuda:") and self.device != "cuda:0":
            raise ValueError(
                f"modes: vllm runs on the first GPU CUDA_VISIBLE_DEVICES names, not {self.device}"
                f"; set CUDA_VISIBLE_DEVICES={self.device.removeprefix('cuda:')} and --device cuda"
            )
        if not self.request_rates:
            raise ValueError("request_rate: name at least one rate")
        for rate in self.request_rates:
            if not rate > 0:
                raise ValueError(f"request_rate: must be > 0 or inf, got {rate}")
        if self.sparse not in SPARSE_ALGORITHMS:
            raise ValueError(f"sparse: unknown algorithm {self.sparse!r}; use {SPARSE_ALGORITHMS}")
        if self.lookahead_share is not None and not self.lookahead:
            raise ValueError("lookahead_share: needs lookahead (--lookahead)")
        # spin's settings, checked by its own config now rather than when its engine is built
        # (after the modes before it have run)
        sparse_config_from_args(self.sparse, **self._sparse_kwargs("spin"))
        for name in ("gpu_cache_tokens", "cpu_cache_tokens", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness: must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit: must be > 0 seconds, got {self.time_limit}")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")

    def cache_kwargs(self, mode: str, num_layers: int) -> dict:
        """The SPIN cache's `LLM(...)` keyword arguments that were set (issue 3's names), for
        a tiered `mode` of a model with `num_layers` layers. `gpu_cache_tokens` counts KV of
        every layer (what dense's pool holds); `spin` also keeps its dense layers' KV in HBM
        for every CPU-tier token, so when `cpu_cache_tokens` is set that comes out of its
        slots and both modes hold the same HBM KV bytes."""
        slots = self.gpu_cache_tokens
        if slots is not None and mode == "spin" and self.cpu_cache_tokens is not None:
            dense = SparseConfig().dense_layers
            slots = (slots * num_layers - self.cpu_cache_tokens * dense) // (num_layers - dense)
            if slots < self.page_size:
                raise ValueError(
                    f"gpu_cache_tokens: {self.gpu_cache_tokens} tokens of HBM KV cannot hold "
                    f"spin's {dense} dense layers for {self.cpu_cache_tokens} CPU-tier tokens"
                )
        kwargs = dict(
            sparse=self.sparse,
            **self._sparse_kwargs(mode),
            gpu_cache_tokens=slots,
            cpu_cache_tokens=self.cpu_cache_tokens,
        )
        return {k: v for k, v in kwargs.items() if v is not None}

    def _sparse_kwargs(self, mode: str) -> dict:
        """`SparseConfig` fields this benchmark sets for `mode` (None: the default)."""
        lookahead = self.lookahead and mode == "spin"
        return dict(
            token_budget=self.token_budget,
            buffer_ratio=self.buffer_ratio,
            min_buffer_ratio=self.min_buffer_ratio,
            lookahead=True if lookahead else None,
            lookahead_share=self.lookahead_share if lookahead else None,
        )
