"""`spin-ray generate`: complete one or more prompts and print the text."""

from __future__ import annotations

import argparse
import json

from spin_ray.commands.engine_args import (
    add_engine_args,
    add_sparse_args,
    engine_kwargs,
    sparse_kwargs,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text for prompts",
        description="Generate text for one or more prompts with the offline engine.",
    )
    add_engine_args(parser)
    add_sparse_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="most tokens to generate (default %(default)s)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy (default %(default)s)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: smallest set of tokens whose probability reaches this, in (0, 1] "
        "(default %(default)s: all)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=-1,
        help="sample among the k most likely tokens; -1 for all (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spin_ray import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=0 if args.seed is None else args.seed,  # the engine's default seed
    )
    llm = LLM(**engine_kwargs(args), **sparse_kwargs(args))
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        outputs = llm.chat(conversations, params)
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, output in zip(args.prompt, outputs):
        completion = output.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": completion.text,
                        "token_ids": completion.token_ids,
                        "finish_reason": completion.finish_reason,
                        "ttft_s": output.metrics.ttft,
                        "tpot_s": output.metrics.tpot,
                    }
                )
            )
        else:
            print(f"{prompt!r} -> {completion.text!r} [{completion.finish_reason}]")
    return 0
