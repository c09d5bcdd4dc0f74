"""What one `spin-ray bench` run measures: engine settings, modes, workload and request rates."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from spin_ray.bench.workloads import WorkloadSpec
from spin_ray.engine.options import options
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.presets import PRESETS, preset

MODES = PRESETS + ("vllm",)
"""Every engine the benchmark knows: spin-ray's presets (spin_ray/sparse/presets.py), and
`vllm`, real vLLM where it is installed."""


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
    """Modes to run, in order, one engine at a time: presets and `vllm`."""
    request_rates: tuple[float, ...] = (math.inf,)
    """Poisson arrival rates in requests/s; inf sends every request at once (offline)."""
    sparse: SparseConfig = SparseConfig()
    """The spin preset's settings; the other presets are made from them. Its
    `gpu_cache_tokens` is the HBM KV capacity of every mode, in tokens of every layer's KV
    (dense's page pool, the tiered presets' slots, less spin's dense layers' KV: see
    `engine_sparse`); None sizes each from free memory."""
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    """Engine options of every spin-ray engine (spin_ray/engine/options.py: page_size,
    max_num_seqs, dtype, ...); vLLM gets the ones it shares. `max_model_len` unset: the
    workload's longest request."""
    burstiness: float = 1.0
    """Shape of the Gamma inter-arrival times at a finite rate (`vllm bench serve`'s): 1 is
    Poisson, below 1 burstier, above 1 more even; the mean rate stays the request rate."""
    max_concurrency: int | None = None
    """Requests in flight at most (a due request waits for one to finish; its TTFT counts
    from when it is sent, as `vllm bench serve` counts it); None: no limit."""
    metrics_port: int | None = None
    """Serve every spin-ray engine's Prometheus metrics at http://127.0.0.1:<port>/metrics
    while it runs (series told apart by their `algorithm` and `tiers` labels); None: none."""
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
        device = self.option("device")
        if "vllm" in self.modes and device.startswith("cuda:") and device != "cuda:0":
            raise ValueError(
                f"modes: vllm runs on the first GPU CUDA_VISIBLE_DEVICES names, not {device}"
                f"; set CUDA_VISIBLE_DEVICES={device.removeprefix('cuda:')} and --device cuda"
            )
        unknown = sorted(set(self.engine_options) - set(options()))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown engine option")
        if not self.request_rates:
            raise ValueError("request_rate: name at least one rate")
        for rate in self.request_rates:
            if not rate > 0:
                raise ValueError(f"request_rate: must be > 0 or inf, got {rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness: must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit: must be > 0 seconds, got {self.time_limit}")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")

    def option(self, name: str) -> Any:
        """An engine option as every spin-ray engine of the run gets it."""
        return self.engine_options.get(name, options()[name].default)

    def engine_sparse(self, mode: str, num_layers: int) -> SparseConfig | None:
        """The sparse config of preset `mode` for a model of `num_layers` layers. The
        `gpu_cache_tokens` given count KV of every layer (what dense's pool holds); `spin`
        also keeps its dense layers' KV in HBM for every CPU-tier token, so when
        `cpu_cache_tokens` is set that comes out of its slots and both hold the same HBM KV
        bytes."""
        config = preset(mode, self.sparse)
        slots, cpu = self.sparse.gpu_cache_tokens, self.sparse.cpu_cache_tokens
        if config is None or slots is None or mode != "spin" or cpu is None:
            return config
        dense = config.dense_layers
        slots = (slots * num_layers - cpu * dense) // (num_layers - dense)
        if slots < self.option("page_size"):
            raise ValueError(
                f"gpu_cache_tokens: {self.sparse.gpu_cache_tokens} tokens of HBM KV cannot "
                f"hold spin's {dense} dense layers for {cpu} CPU-tier tokens"
            )
        return replace(config, gpu_cache_tokens=slots)
