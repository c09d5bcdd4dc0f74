"""CUDA-graph decode against eager decode, inside the engine: same tokens, and how much faster.

    python bench/decode_graphs_check.py [--device cuda] [--model llama-3.2-1b] \\
        [--batch-sizes 1,3,8,16] [--prompt-len 2048] [--max-tokens 64] [--modes dense,spin] \\
        [--sparse quest]

For each mode (dense; spin = `--sparse` (Quest by default), 512-token budget, HBM and CPU tiers
big enough for the whole batch; spin+lookahead = spin fetching each layer's pages one layer
early) it builds `LLM(enforce_eager=True)`, then, once that one is freed,
`LLM(enforce_eager=False)`, and generates greedily (EOS ignored) for each batch size the same
seeded prompts, all submitted at once and prefilled in one step, so every later step decodes the
whole batch. Each batch size runs once untimed first (compilation, graph capture). Per (mode,
batch size) it records TPOT p50 of both runs (from `RequestOutput.metrics`), the share of
requests whose token ids are identical, the first position where any differs, a SHA-256 of each
run's tokens (to compare two trees' runs: before and after a change), for sparse modes the
cache's lookups and hits, and whether the second engine really replays graphs (`graphs_used`:
not on the CPU, nor with a backend that cannot be captured).

Batch sizes that are a graph size of the engine (`graph_batch_sizes` of the largest batch:
every size up to 16, multiples of 8, and the largest itself) replay a graph of exactly their
shape and must give identical tokens; other sizes run padded, where GEMM shapes change and bf16
rounding may too, so their agreement is reported, not required.

Prints one JSON line per (mode, batch size), then a Markdown table; `--output` writes all as
JSON. Exits non-zero if a captured size's tokens differ.

On the CPU both runs are eager, since the engine captures graphs only on CUDA: a smoke test of
this script, not of the graphs, and its timings mean nothing (under a minute with these sizes):

    python bench/decode_graphs_check.py --device cpu --model spin-tiny --dtype float32 \\
        --batch-sizes 1,3,8 --prompt-len 1024 --max-tokens 16
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import statistics
import sys
from pathlib import Path

import torch

SPIN_TOKEN_BUDGET = 512
PROMPT_VOCAB = (3, 259)
"""Prompt token ids are drawn from this range: inside every model's vocabulary (spin-tiny's
byte-level tokenizer, which the named shapes borrow, has fewer than 320 ids)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama-3.2-1b", help="named shape or checkpoint")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,3,8,16")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--modes", default="dense,spin", help="dense, spin and/or spin+lookahead")
    parser.add_argument(
        "--sparse",
        default="quest",
        help="the spin modes' algorithm; one that cannot run in CUDA graphs shows graphs_used "
        "false (its graph_safe attribute; the check that it may be set)",
    )
    parser.add_argument("--output", default=None, help="write every result here as JSON")
    args = parser.parse_args()

    from spin_ray import LLM, SamplingParams
    from spin_ray.bench.report import environment
    from spin_ray.engine.config import resolve_device
    from spin_ray.engine.decode_graphs import graph_batch_sizes

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        if mode not in ("dense", "spin", "spin+lookahead"):
            raise ValueError(f"modes: unknown mode {mode!r}; use dense, spin or spin+lookahead")
    if args.max_tokens < 2:
        raise ValueError(f"max_tokens: must be >= 2 for a TPOT, got {args.max_tokens}")
    device = resolve_device(args.device)
    if not device.startswith("cuda"):
        print("note: no CUDA, so both runs are eager (a smoke test)", file=sys.stderr)

    largest = max(batch_sizes)
    prompts = [
        {"prompt_token_ids": [rng.randrange(*PROMPT_VOCAB) for _ in range(args.prompt_len)]}
        for rng in (random.Random(i) for i in range(largest))
    ]
    seq_tokens = args.prompt_len + args.max_tokens
    graph_sizes = set(graph_batch_sizes(largest))  # the engine's graph sizes (max_num_seqs)
    engine_kwargs = dict(
        model=args.model,
        device=device,
        dtype=args.dtype,
        max_model_len=seq_tokens,
        max_num_seqs=largest,
        max_num_batched_tokens=largest * args.prompt_len,  # the whole batch prefills at once
        progress=False,
    )
    sparse_kwargs = dict(
        sparse=args.sparse,
        token_budget=SPIN_TOKEN_BUDGET,
        gpu_cache_tokens=largest * seq_tokens,
        cpu_cache_tokens=largest * seq_tokens,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    warmup = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def generate(llm, batch: list[dict]) -> dict:
        llm.generate(batch, warmup, use_tqdm=False)
        before = llm.kv_stats()
        outputs = llm.generate(batch, params, use_tqdm=False)
        after = llm.kv_stats()
        return dict(
            tokens=[o.outputs[0].token_ids for o in outputs],
            tpot_p50_ms=statistics.median(o.metrics.tpot for o in outputs) * 1e3,
            lookups=after.lookups - before.lookups,
            hits=after.hits - before.hits,
        )

    def run_all(mode: str, enforce_eager: bool) -> tuple[dict[int, dict], bool]:
        """Every batch size on one engine, and whether that engine replays decode graphs."""
        kwargs = dict(engine_kwargs)
        if mode != "dense":
            kwargs.update(sparse_kwargs, lookahead=mode == "spin+lookahead")
        llm = LLM(**kwargs, enforce_eager=enforce_eager)
        graphs_used = llm.llm_engine.decode_graphs is not None
        runs = {b: generate(llm, prompts[:b]) for b in batch_sizes}
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return runs, graphs_used

    results = []
    for mode in modes:
        eager, _ = run_all(mode, enforce_eager=True)
        graphs, graphs_used = run_all(mode, enforce_eager=False)
        for b in batch_sizes:
            row = compare(mode, b, eager[b], graphs[b], graphs_used, b in graph_sizes)
            print(json.dumps(row), flush=True)
            results.append(row)

    print(markdown_table(results))
    failed = [r for r in results if r["identical_required"] and r["identical_fraction"] < 1]
    for r in failed:
        print(f"FAIL {r['mode']} batch {r['batch_size']}: tokens differ at a captured size")
    if args.output:
        document = dict(args=vars(args), environment=environment(device), results=results)
        Path(args.output).write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failed else 0


def tokens_digest(tokens: list[list[int]]) -> str:
    """SHA-256 of a run's token ids: runs of two trees (before and after a change) compare by
    it."""
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def compare(
    mode: str, batch_size: int, eager: dict, graphs: dict, graphs_used: bool, captured: bool
) -> dict:
    """One (mode, batch size): latency of both runs and how far their tokens agree; `captured`:
    the batch size is a graph size itself (no padding), so the tokens must agree."""
    pairs = list(zip(eager["tokens"], graphs["tokens"], strict=True))
    row = dict(
        mode=mode,
        batch_size=batch_size,
        graphs_used=graphs_used,
        identical_required=captured,
        tpot_p50_eager_ms=round(eager["tpot_p50_ms"], 3),
        tpot_p50_graphs_ms=round(graphs["tpot_p50_ms"], 3),
        speedup=round(eager["tpot_p50_ms"] / graphs["tpot_p50_ms"], 3),
        identical_fraction=sum(a == b for a, b in pairs) / len(pairs),
        first_difference=min((first_difference(a, b) for a, b in pairs if a != b), default=None),
        eager_tokens_sha256=tokens_digest(eager["tokens"]),
        graphs_tokens_sha256=tokens_digest(graphs["tokens"]),
    )
    if mode != "dense":
        for name, run in (("eager", eager), ("graphs", graphs)):
            row[f"lookups_{name}"] = run["lookups"]
            row[f"hits_{name}"] = run["hits"]
    return row


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two different token lists disagree (or where one ends)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| mode | batch | graphs | captured size | TPOT p50 eager ms | TPOT p50 graphs ms "
        "| speedup | identical | first diff | hit rate eager | hit rate graphs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rates = [
            f"{r[f'hits_{n}'] / r[f'lookups_{n}']:.1%}" if r.get(f"lookups_{n}") else "-"
            for n in ("eager", "graphs")
        ]
        first = "-" if r["first_difference"] is None else r["first_difference"]
        lines.append(
            f"| {r['mode']} | {r['batch_size']} | {'yes' if r['graphs_used'] else 'no'} "
            f"| {'yes' if r['identical_required'] else 'no'} "
            f"| {r['tpot_p50_eager_ms']:.2f} | {r['tpot_p50_graphs_ms']:.2f} "
            f"| {r['speedup']:.2f}x | {r['identical_fraction']:.0%} | {first} "
            f"| {rates[0]} | {rates[1]} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
