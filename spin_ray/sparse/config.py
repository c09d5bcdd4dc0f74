"""The frozen configuration of the sparse, hierarchical KV cache."""

from __future__ import annotations

from dataclasses import dataclass, replace

ALGORITHMS = ("dense", "quest", "shadowkv", "retroinfer", "seer")
"""Sparse attention algorithms (`SparseConfig.algorithm`)."""

MODES = ("dense", "dense-offload", "sparse-naive", "spin")
"""How the engine keeps and reads KV (`SparseConfig.mode`)."""


@dataclass(frozen=True)
class SparseConfig:
    """Sparse attention over a two-tier (HBM + host memory) KV cache. Token counts are per
    sequence; the page size is `CacheConfig.page_size`."""

    algorithm: str = "quest"
    """Which pages each decode step attends to: one of `ALGORITHMS` ("dense" = all of them)."""
    mode: str = "spin"
    """"dense": all KV in HBM (the plain dense engine). "dense-offload": KV in host memory,
    every layer reloads the whole context each step (`algorithm` and `dense_layers` are not
    used). "sparse-naive": the algorithm with no HBM buffer, every selected page is fetched
    every step. "spin": the algorithm with the locality-aware HBM buffer."""
    token_budget: int | float = 2048
    """Tokens each (layer, KV head) attends per decode step, sink and local window included: an
    int is a token count, a float in (0, 1] a fraction of the context."""
    sink_tokens: int = 64
    """First tokens of every sequence always attended."""
    local_tokens: int = 256
    """Last tokens of every sequence always attended (tokens the index does not yet cover are
    attended too)."""
    dense_layers: int = 2
    """The first this many layers attend densely with their KV kept in HBM."""
    buffer_ratio: float = 15.0
    """HBM pages a request keeps for reuse, as a multiple of its mandatory pages (this step's
    selection + sink + local), when HBM is free (under pressure buffers shrink toward
    `min_buffer_ratio`). On the H200 at 8 × 64K, budget 2048, a ratio of 5 hit 65% of lookups
    and 15 hit 93%, which made the decode step 1.46× → 0.94× dense's (bench/RESULTS.md)."""
    min_buffer_ratio: float = 4.0
    """Buffer pages a request keeps under memory pressure (multiple of mandatory, capped at
    `buffer_ratio`); admission needs mandatory × (1 + that) free HBM pages. A larger floor runs
    fewer requests, each with more reuse: on the H200 at equal HBM (half-scale LongBench-v2,
    random weights) floors 1 / 4 / 8 ran batches of 18 / 10 / 5 at hit rates 55 / 81 / 97% and
    0.39× / 0.84× / 0.91× dense's output throughput; 4 is where SPIN reports a trained model's
    hit rate levelling off (bench/RESULTS.md)."""
    lookahead: bool = False
    """`spin` mode: while a decode step computes layer l, select layer l + 1's pages with a
    query predicted from layer l's input (InfiniGen's cross-layer prediction), place them in
    the HBM buffer and fetch the misses on a side stream, so their PCIe time overlaps layer
    l's compute; layer l + 1 then selects with its real query as always (the same pages are
    attended, so the same tokens) and fetches only what the prediction missed. Needs
    `min_buffer_ratio` >= 1 (room for both lists). On a scaled-down random-weight Llama
    (`bench/lookahead_overlap.py`) the predicted selection held 78% of the real one's pages,
    the previous step's selection 48%. On the H200 (8 x 64K, random weights) a step takes the
    same time with it at buffer ratio 4 (the mispredicted 22% add PCIe traffic that the overlap
    then hides) and 8% longer at 15; at saturation it gained ~15% throughput (RESULTS.md)."""
    lookahead_share: float = 1.0
    """The share of the top-k pages a lookahead selects and fetches early: its best-scored
    ones (rounded up; sink and local pages always). Below 1 it spends less PCIe time on
    mispredictions: on the scaled-down Llama the real selection took 88% of the predicted
    pages a buffer lacked from the better-scored half, 57% from the other. On the H200 (8 x
    64K, buffer ratio 4) share 0.5 moved 22% fewer bytes than 1 at a step within 3% of spin's
    without lookahead, so 1 stays the default (RESULTS.md)."""
    gpu_cache_tokens: int | None = None
    """Tokens of HBM working-set slots (each holds one page of every offloaded layer and KV
    head); None: what GPU memory leaves after weights (CUDA), the CPU tier's size (CPU)."""
    cpu_cache_tokens: int | None = None
    """Tokens of host-memory KV (whole contexts); None: `host_memory_fraction` of available host
    memory (CUDA), `CacheConfig.num_pages` or `cpu_kv_tokens` (CPU)."""
    host_memory_fraction: float = 0.5
    """Share of available host memory the CPU tier takes when `cpu_cache_tokens` is None."""
    index_interval: int = 16
    """Decode steps between index updates of algorithms whose summaries are rebuilt from the
    CPU tier (ShadowKV, RetroInfer, Seer; Quest folds every key in as it is stored); newer
    tokens are attended as part of the local window until indexed."""
    lru_buckets: int = 64
    """Recency buckets of the HBM buffer's LRU (pages older than this many steps tie)."""
    segment_pages: int = 16
    """Pages per second-level segment of the residency page tables (a power of two)."""
    shadowkv_chunk_size: int = 8
    """ShadowKV: tokens per landmark chunk (divides the page size)."""
    retroinfer_segment_tokens: int = 8192
    """RetroInfer: k-means runs within segments of this many tokens."""
    retroinfer_cluster_tokens: int = 16
    """RetroInfer: average tokens per cluster (clusters = tokens / this)."""
    retroinfer_kmeans_iters: int = 10
    """RetroInfer: k-means iterations."""
    retroinfer_estimation_fraction: float = 0.232
    """RetroInfer: share of clusters, ranked after the retrieved ones, whose attention is
    estimated from centroid and value sum (0 turns the estimation zone off)."""
    seer_block_size: int = 64
    """Seer: tokens per gated block (a multiple of the page size)."""
    seer_gate_path: str | None = None
    """Seer: safetensors/torch file of gate weights `layers.{i}.q_gate` [Hkv, D, Dg] and
    `layers.{i}.k_gate` [Hkv, 3D, Dg]; None: the deterministic test gate (see seer.py)."""
    fused_retrieve: bool | None = None
    """Retrieve (buffer lookup, LRU eviction, residency update) with the fused Triton kernels,
    two launches per layer (`kernels/spin_retrieve.py`), instead of their torch reference;
    rows too wide for one program take the reference either way. None: the kernels on CUDA,
    the reference on the CPU. True on the CPU runs the kernels in Triton's interpreter
    (`TRITON_INTERPRET=1`, as the tests do); False takes the reference on CUDA too."""
    check_invariants: bool = False
    """Check on every decode layer what the cache manager guarantees and the decode path
    therefore does not check: a request holds at least its mandatory slots, and the step
    reserved enough residency segments. Each check synchronises with the device, and the
    decode path is then not captured in CUDA graphs: for tests."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"sparse: unknown algorithm {self.algorithm!r}; use one of {ALGORITHMS}"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown mode {self.mode!r}; use one of {MODES}")
        budget = self.token_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"token_budget: expected an int or a float, got {budget!r}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"token_budget: must be >= 1 token, got {budget}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(f"token_budget: a fraction must be in (0, 1], got {budget}")
        _at_least("sink_tokens", self.sink_tokens, 0)
        _at_least("local_tokens", self.local_tokens, 1)
        _at_least("dense_layers", self.dense_layers, 0)
        _at_least("index_interval", self.index_interval, 1)
        if self.buffer_ratio < 0:
            raise ValueError(f"buffer_ratio: must be >= 0, got {self.buffer_ratio}")
        if self.min_buffer_ratio < 0:
            raise ValueError(f"min_buffer_ratio: must be >= 0, got {self.min_buffer_ratio}")
        if self.lookahead and self.mode != "spin":
            raise ValueError(f"lookahead: needs mode 'spin' (an HBM buffer), got {self.mode!r}")
        if not 0.0 < self.lookahead_share <= 1.0:
            raise ValueError(f"lookahead_share: must be in (0, 1], got {self.lookahead_share}")
        if self.lookahead and min(self.min_buffer_ratio, self.buffer_ratio) < 1:
            raise ValueError(
                "lookahead: needs min_buffer_ratio and buffer_ratio >= 1 (a request's buffer "
                "holds a predicted and a real selection at once), got "
                f"{self.min_buffer_ratio} and {self.buffer_ratio}"
            )
        for name in ("gpu_cache_tokens", "cpu_cache_tokens"):
            value = getattr(self, name)
            if value is not None:
                _at_least(name, value, 1)
        if not 0.0 < self.host_memory_fraction <= 0.95:
            raise ValueError(
                f"host_memory_fraction: must be in (0, 0.95], got {self.host_memory_fraction}"
            )
        if not 2 <= self.lru_buckets <= 250:
            raise ValueError(f"lru_buckets: must be in [2, 250], got {self.lru_buckets}")
        for name in ("segment_pages", "shadowkv_chunk_size", "seer_block_size"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}: must be a power of two >= 1, got {value}")
        _at_least("retroinfer_segment_tokens", self.retroinfer_segment_tokens, 1)
        _at_least("retroinfer_cluster_tokens", self.retroinfer_cluster_tokens, 1)
        _at_least("retroinfer_kmeans_iters", self.retroinfer_kmeans_iters, 0)
        if not 0.0 <= self.retroinfer_estimation_fraction < 1.0:
            raise ValueError(
                "retroinfer_estimation_fraction: must be in [0, 1), got "
                f"{self.retroinfer_estimation_fraction}"
            )

    @property
    def offloads(self) -> bool:
        """KV lives in the CPU tier (every mode but "dense")."""
        return self.mode != "dense"

    @property
    def retains(self) -> bool:
        """Fetched pages stay in HBM across steps (the "spin" mode's buffer)."""
        return self.mode == "spin"

    @property
    def effective_algorithm(self) -> str:
        return "dense" if self.mode == "dense-offload" else self.algorithm

    @property
    def effective_dense_layers(self) -> int:
        return 0 if self.mode == "dense-offload" else self.dense_layers

    def check_page_size(self, page_size: int) -> None:
        """Raise `ValueError` naming the field when a partition size does not fit the pages."""
        chunk = self.shadowkv_chunk_size
        if self.effective_algorithm == "shadowkv" and page_size % chunk:
            raise ValueError(f"shadowkv_chunk_size: {chunk} must divide the page size {page_size}")
        if self.effective_algorithm == "seer" and self.seer_block_size % page_size:
            raise ValueError(
                f"seer_block_size: {self.seer_block_size} must be a multiple of the page size "
                f"{page_size}"
            )
        if self.effective_algorithm == "retroinfer" and self.retroinfer_segment_tokens % page_size:
            raise ValueError(
                f"retroinfer_segment_tokens: {self.retroinfer_segment_tokens} must be a "
                f"multiple of the page size {page_size}"
            )


def _at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")


def sparse_config_from_args(
    algorithm: str | None, base: SparseConfig | None = None, **fields: object
) -> SparseConfig | None:
    """The config that flat keyword arguments (`LLM(sparse=..., token_budget=...)`) describe:
    `base` (or the defaults) with every non-None field replaced; None when nothing is given,
    which means the plain dense engine."""
    given = {name: value for name, value in fields.items() if value is not None}
    if algorithm is not None:
        given["algorithm"] = algorithm
    if base is None and not given:
        return None
    return replace(base or SparseConfig(), **given)
