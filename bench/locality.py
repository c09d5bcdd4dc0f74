"""HBM buffer locality of a trained model against a random-weight model of exactly its shape.

Both decode teacher-forced over the same real text (`spin_ray.eval.likelihood.natural_text`,
tokenized by SmolLM2's tokenizer): the context's K/V computed once per model and length (one
dense forward), then `--steps` forced decode steps in a `spin` engine per budget and buffer
ratio; the hit rate is the buffer's hits over lookups of those steps (decode only: prefill does
no lookups). A random model left to decode freely repeats one token, its queries repeat and its
hit rate says nothing; teacher forcing gives both models the same changing input.

    python bench/locality.py --lengths 2048,4096,8192 --budgets 256,1024 --ratios 4,15
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from spin_ray import LLM, SamplingParams
from spin_ray.eval.dense_prefill import dense_prompt_kv
from spin_ray.eval.likelihood import natural_text
from spin_ray.eval.runner import IMPORT_MARGIN
from spin_ray.models.loader import (
    load_model,
    load_random_model,
    load_tokenizer,
    model_arch,
    resolve_model_path,
)

MODELS = ("smollm2-135m", "smollm2-135m-random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--budgets", default="256,1024")
    parser.add_argument("--ratios", default="4,15")
    parser.add_argument("--algorithm", default="quest")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--sink-tokens", type=int, default=64)
    parser.add_argument("--local-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="of %(default)s")
    parser.add_argument("--output", default=None, help="JSON rows")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]
    ids = load_tokenizer("smollm2-135m")(natural_text(), add_special_tokens=False)["input_ids"]
    rows = []
    models = [m for m in MODELS if m in args.models.split(",")]
    for name in models:
        if name == MODELS[0]:
            model = load_model(resolve_model_path(name), None, torch.float32, args.device)
        else:
            model = load_random_model(model_arch(name), None, torch.float32, args.device)
        for length in lengths:
            context, forced = ids[: length - args.steps], ids[length - args.steps : length]
            kv = dense_prompt_kv(model, context[:-IMPORT_MARGIN])
            for budget in budgets:
                for ratio in ratios:
                    start = time.perf_counter()
                    stats = _decode_stats(name, args, length, budget, ratio, context, forced, kv)
                    row = dict(model=name, length=length, budget=budget, buffer_ratio=ratio,
                               algorithm=args.algorithm, steps=args.steps,
                               sink_tokens=args.sink_tokens, local_tokens=args.local_tokens,
                               lookups=stats.lookups, hits=stats.hits,
                               hit_rate=stats.hits / stats.lookups, evictions=stats.evictions,
                               seconds=time.perf_counter() - start)  # fmt: skip
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        del model
    if len(models) == len(MODELS):
        _print_table(rows, lengths, budgets, ratios)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


def _decode_stats(name, args, length, budget, ratio, context, forced, kv):
    """`KVStats` of the forced decode steps (prefill does no lookups)."""
    llm = LLM(model=name, device=args.device, max_model_len=length, max_num_seqs=1,
              cpu_kv_tokens=length + 64, progress=False, sparse=args.algorithm,
              token_budget=budget, buffer_ratio=ratio, min_buffer_ratio=min(4.0, ratio),
              sink_tokens=args.sink_tokens, local_tokens=args.local_tokens,
              cpu_cache_tokens=length + 64)  # fmt: skip
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=len(forced), temperature=0.0, ignore_eos=True,
                            forced_token_ids=forced)  # fmt: skip
    engine.add_request("r", {"prompt_token_ids": context}, params, prompt_kv=kv)
    while engine.has_unfinished_requests():
        engine.step()
    return engine.kv_stats()


def _print_table(rows, lengths, budgets, ratios) -> None:
    head = ["length", "budget", "buffer ratio"] + [f"{m} hit rate" for m in MODELS]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for length in lengths:
        for budget in budgets:
            for ratio in ratios:
                rates = [
                    next(r["hit_rate"] for r in rows if (r["model"], r["length"], r["budget"],
                         r["buffer_ratio"]) == (m, length, budget, ratio))
                    for m in MODELS
                ]  # fmt: skip
                cells = [str(length), str(budget), f"{ratio:g}"] + [f"{x:.1%}" for x in rates]
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
