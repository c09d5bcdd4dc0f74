"""GPU check of the partition top-k kernel: the chosen sets against torch.topk's, and time.

    python bench/partition_topk.py

Then one spin-mode engine run on spin-tiny (fp32) through the kernel, against dense's tokens.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from spin_ray.kernels.partition_topk import partition_topk, partition_topk_ref


def check(b: int, h: int, p: int, k: int) -> tuple[bool, float, float]:
    g = torch.Generator(device="cuda").manual_seed(p)
    scores = torch.randn(b, h, p, device="cuda", generator=g)
    scores[:, :, -p // 10 :] = -torch.inf  # past the context
    kk = torch.full((b, h), k, device="cuda", dtype=torch.int64)
    out = partition_topk(scores, kk, k)
    ref = partition_topk_ref(scores, kk, k)
    got = scores.gather(-1, out.clamp(min=0)).masked_fill(out < 0, -torch.inf).sort(-1).values
    want = scores.gather(-1, ref.clamp(min=0)).masked_fill(ref < 0, -torch.inf).sort(-1).values
    same = torch.equal(got, want) and torch.equal((out >= 0).sum(-1), (ref >= 0).sum(-1))
    t_kernel = do_bench(lambda: partition_topk(scores, kk, k), return_mode="median")
    t_ref = do_bench(lambda: partition_topk_ref(scores, kk, k), return_mode="median")
    return same, t_kernel, t_ref


def engine_check() -> bool:
    from spin_ray import LLM, SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [
        {"prompt_token_ids": [(5 * i + j) % 250 for j in range(700 + 90 * i)]} for i in range(3)
    ]
    kw = dict(model="spin-tiny", device="cuda", dtype="float32", progress=False)
    llm = LLM(**kw, num_pages=512)  # a small pool: the second engine needs the GPU memory
    dense = llm.generate(prompts, params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    spin = LLM(**kw, sparse="quest", token_budget=1.0, dense_layers=0).generate(
        prompts, params, use_tqdm=False
    )
    return [o.outputs[0].token_ids for o in dense] == [o.outputs[0].token_ids for o in spin]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| B | Hkv | P | K | same set as torch.topk | kernel ms | torch.topk ms |")
    for b, h, p, k in [
        (32, 8, 1024, 128),
        (32, 8, 4096, 128),
        (32, 8, 8192, 128),
        (8, 8, 3000, 37),
    ]:
        same, tk, tr = check(b, h, p, k)
        print(f"| {b} | {h} | {p} | {k} | {same} | {tk:.4f} | {tr:.4f} |")
    print(f"spin-tiny quest at full budget on CUDA equals dense: {engine_check()}")


if __name__ == "__main__":
    main()
