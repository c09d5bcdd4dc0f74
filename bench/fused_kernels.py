"""GPU check of the fused per-token kernels and of one dense engine decode step.

    python bench/fused_kernels.py [--model llama-3.1-8b] [--batch 16] [--context 4096]

1. Each fused kernel (RMSNorm, add + RMSNorm, RoPE, SiLU-and-mul) against its torch reference
   on random bf16 inputs of Llama-3.1-8B sizes, and its time next to the reference's.
2. The dense engine on a random-weight named shape: a batch of `--batch` requests of
   `--context` prompt tokens, then decode; prints the median time of a decode step (TPOT).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from triton.testing import do_bench

from spin_ray.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from spin_ray.kernels.rope import rope_, rope_ref
from spin_ray.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from spin_ray.models.rope import Llama3RopeScaling, rope_inv_freq


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_kernels(tokens: int) -> list[tuple[str, float, float, float]]:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, 4096, device=dev, dtype=dt)
    r = torch.randn(tokens, 4096, device=dev, dtype=dt)
    w = (1 + 0.1 * torch.randn(4096, device=dev)).to(dt)
    q = torch.randn(tokens, 32, 128, device=dev, dtype=dt)
    pos = torch.randint(0, 131072, (tokens,), device=dev)
    inv = rope_inv_freq(128, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192)).to(dev)
    gu = torch.randn(tokens, 2 * 14336, device=dev, dtype=dt)
    rows = []
    cases = [
        ("rms_norm", lambda: rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5)),
        (
            "add_rms_norm",
            lambda: add_rms_norm(x, r.clone(), w, 1e-5)[0],
            lambda: add_rms_norm_ref(x, r, w, 1e-5)[0],
        ),
        ("rope", lambda: rope_(q.clone(), pos, inv), lambda: rope_ref(q, pos, inv)),
        ("silu_and_mul", lambda: silu_and_mul(gu), lambda: silu_and_mul_ref(gu)),
    ]
    for name, fused, ref in cases:
        err = rel_err(fused(), ref())
        rows.append(
            (name, err, do_bench(fused, return_mode="median"), do_bench(ref, return_mode="median"))
        )
    return rows


def decode_step_time(model: str, batch: int, context: int, steps: int) -> float:
    from spin_ray import LLM, SamplingParams

    llm = LLM(
        model=model,
        device="cuda",
        dtype="bfloat16",
        max_model_len=context + steps + 8,
        max_num_seqs=batch,
        progress=False,
    )
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0)
    for i in range(batch):
        engine.add_request(
            f"r{i}", {"prompt_token_ids": [(7 * i + j) % 300 for j in range(context)]}, params
        )
    times = []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        if (
            engine.num_running == batch
            and engine.scheduler.running[0].num_computed_tokens >= context
        ):
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=24)
    a = p.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| kernel | rel err vs ref | fused ms | torch ref ms |  (16 decode tokens)")
    for name, err, t_fused, t_ref in check_kernels(16):
        print(f"| {name} | {err:.2e} | {t_fused:.4f} | {t_ref:.4f} |")
    step = decode_step_time(a.model, a.batch, a.context, a.steps)
    print(
        f"dense decode step, {a.model}, batch {a.batch} x {a.context}: {step * 1e3:.2f} ms median"
    )


if __name__ == "__main__":
    main()
