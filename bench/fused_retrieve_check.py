"""The fused retrieval kernels (kernels/spin_retrieve.py) against their torch reference,
inside the engine, on a GPU (or the CPU with the Triton interpreter):

1. budget covering the whole context, HBM slots for half the batch's KV: spin mode (fused)
   generates exactly dense's tokens;
2. small budget (64 tokens, buffer_ratio 1: evictions every step): fused and torch path give the
   same tokens and the same lookups, hits, evictions and H2D bytes.

    python bench/fused_retrieve_check.py [--device cuda]

Prints one JSON line per run and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PROMPT_LENS = (300, 700, 1400, 2100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from spin_ray import LLM, SamplingParams
    from spin_ray.sparse import SparseConfig

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [
        {"prompt_token_ids": [(i * 31 + j * 17) % 250 + 3 for j in range(n)]}
        for i, n in enumerate(PROMPT_LENS)
    ]
    kv_tokens = sum(PROMPT_LENS) + len(PROMPT_LENS) * args.max_tokens

    def run(name, **kwargs):
        llm = LLM(model="spin-tiny", device=args.device, dtype="float32", page_size=16,
                  progress=False, **kwargs)  # fmt: skip
        t0 = time.perf_counter()
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        seconds = time.perf_counter() - t0
        stats = llm.kv_stats() if kwargs.get("sparse") else None
        figures = {} if stats is None else dict(
            lookups=stats.lookups, hits=stats.hits, evictions=stats.evictions,
            h2d_bytes=stats.h2d_bytes,
        )  # fmt: skip
        print(json.dumps(dict(run=name, seconds=round(seconds, 2), **figures)), flush=True)
        return out, figures

    dense, _ = run("dense")
    full, _ = run(
        "spin full budget, fused",
        fused_retrieve=True,
        sparse="quest",
        token_budget=1.0,
        dense_layers=1,
        gpu_cache_tokens=kv_tokens // 2,
    )
    small = dict(
        sparse="quest",
        token_budget=64,
        sink_tokens=16,
        local_tokens=32,
        dense_layers=1,
        sparse_config=SparseConfig(buffer_ratio=1.0, index_interval=4),
    )
    fused_tokens, fused_stats = run("spin small budget, fused", fused_retrieve=True, **small)
    torch_tokens, torch_stats = run("spin small budget, torch path", fused_retrieve=False, **small)
    checks = {
        "full budget: fused spin == dense tokens": full == dense,
        "small budget: fused == torch path tokens": fused_tokens == torch_tokens,
        "small budget: fused == torch path statistics": fused_stats == torch_stats,
        "small budget: buffer hits and evicts": 0 < fused_stats["hits"] < fused_stats["lookups"]
        and fused_stats["evictions"] > 0,
    }
    for name, ok in checks.items():
        print(("ok   " if ok else "FAIL ") + name, flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
