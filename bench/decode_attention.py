"""Dense attention on one GPU: the paged decode kernel against the HBM copy bandwidth measured in
the same run and against torch SDPA on contiguous KV; then the prefill paths.

    python bench/decode_attention.py --out DIR      # CUDA; writes DIR/decode_attention.{md,json}
    TRITON_INTERPRET=1 python bench/decode_attention.py --smoke    # CPU check of this script

Every kernel result is first checked against the torch reference (relative Frobenius error).
Bandwidth counts the bytes a kernel must move: K and V of every context token once, plus q and
the output; the copy baseline counts bytes read plus bytes written (as DESIGN.md's 4.17 TB/s).
The prefill paths run as the engines run them, on cuDNN's plans reused across lengths
(TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 unless the environment sets 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right

from spin_ray.kernels.kv_store import store_kv
from spin_ray.kernels.paged_attention_ref import (
    gather_pages,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    store_kv_ref,
)
from spin_ray.kernels.paged_decode_attention import (
    DecodeKernelConfig,
    choose_num_splits,
    paged_decode_attention,
)
from spin_ray.kernels.paged_prefill_attention import (
    paged_prefill_attention,
    reuse_cudnn_plans_across_lengths,
)


@dataclass(frozen=True)
class BenchSetup:
    """Sizes of one bench run."""

    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """KV heads."""
    head_dim: int
    page_size: int
    main: tuple[int, int]
    """(batch, context) of the headline decode case."""
    sweep: tuple[tuple[int, int], ...]
    """(batch, context) cases of the size table."""
    prefill_lens: tuple[int, ...]
    """Prompt lengths of the no-prefix causal prefill."""
    chunk: int
    """New tokens of the chunk-over-prefix prefill."""
    prefixes: tuple[int, ...]
    """Prefix lengths the chunk attends over."""
    configs: tuple[DecodeKernelConfig, ...]
    """Kernel configurations swept on the headline case."""
    splits: tuple[int, ...]
    """num_splits values tried with each configuration."""
    copy_bytes: int
    """Size of the device-to-device copy of the bandwidth baseline."""


K = 1024
H200 = BenchSetup(
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    page_size=16,
    main=(16, 32 * K),
    sweep=tuple((b, c) for b in (1, 4, 16, 64) for c in (8 * K, 32 * K, 128 * K)),
    prefill_lens=(8 * K, 32 * K),
    chunk=8 * K,
    prefixes=(32 * K, 128 * K),
    configs=tuple(
        DecodeKernelConfig(block_n=n, num_warps=w, num_stages=s)
        for n, w, s in (
            (32, 4, 4),
            (64, 4, 1),
            (64, 4, 2),
            (64, 4, 3),
            (64, 4, 5),
            (64, 8, 3),
            (128, 8, 2),
            (128, 8, 3),
        )
    ),
    splits=(2, 4, 8, 16, 32),
    copy_bytes=4 << 30,
)
SMOKE = BenchSetup(
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    page_size=4,
    main=(2, 40),
    sweep=((1, 16), (2, 40)),
    prefill_lens=(12,),
    chunk=6,
    prefixes=(20,),
    configs=(DecodeKernelConfig(block_n=16), DecodeKernelConfig(block_n=32, num_stages=2)),
    splits=(1, 3),
    copy_bytes=1 << 20,
)
FINE_SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
SIZE_SPLITS = (1, 2, 4, 8, 16, 32, 64)


class Bench:
    def __init__(self, setup: BenchSetup, device: torch.device, smoke: bool):
        self.setup = setup
        self.device = device
        self.smoke = smoke
        self.dtype = torch.bfloat16
        self.gen = torch.Generator(device).manual_seed(0)
        self.log: list[str] = []
        self.results: dict = {}
        tokens = max(
            [b * c for b, c in setup.sweep]
            + [setup.main[0] * setup.main[1], max(setup.prefixes) + setup.chunk]
        )
        num_pages = -(-tokens // setup.page_size)
        shape = (num_pages, setup.page_size, setup.num_kv_heads, setup.head_dim)
        self.k_cache = self.randn(*shape)  # [P, S, Hkv, D]
        self.v_cache = self.randn(*shape)

    def randn(self, *shape, dtype=None):
        return torch.randn(shape, generator=self.gen, device=self.device, dtype=dtype or self.dtype)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.log.append(line)

    def time_ms(self, fn, rep_ms: int = 100) -> float:
        """Median milliseconds per call (CUDA events through do_bench, L2 flushed between
        calls); in smoke mode one wall-clock call after a warm-up."""
        if self.smoke:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")

    def paged_batch(self, batch: int, context: int):
        """A random page table holding `batch` sequences of `context` tokens."""
        pages_per_seq = -(-context // self.setup.page_size)
        perm = torch.randperm(self.k_cache.shape[0], generator=self.gen, device=self.device)
        page_table = perm[: batch * pages_per_seq].view(batch, pages_per_seq).to(torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        return page_table, lens

    def decode_bytes(self, batch: int, context: int) -> int:
        s, item = self.setup, self.dtype.itemsize
        kv = 2 * batch * context * s.num_kv_heads * s.head_dim * item
        return kv + 2 * batch * s.num_heads * s.head_dim * item

    def decode_fn(self, q, page_table, lens, config=None, num_splits=None):
        scale = self.setup.head_dim**-0.5
        return lambda: paged_decode_attention(
            q, self.k_cache, self.v_cache, page_table, lens, scale, num_splits, config=config
        )

    # ---------------------------------------------------------------------------------------
    def copy_bandwidth(self) -> float:
        src = self.randn(self.setup.copy_bytes // 2)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        tbps = 2 * self.setup.copy_bytes / ms / 1e9
        self.say(
            f"HBM copy baseline: {self.setup.copy_bytes / 2**30:.0f} GiB device-to-device, "
            f"{ms:.3f} ms, {tbps:.2f} TB/s (read + write)"
        )
        self.results["copy_tbps"] = tbps
        return tbps

    def check_correctness(self) -> None:
        s = self.setup
        scale = s.head_dim**-0.5
        batch, context = s.main
        page_table, _ = self.paged_batch(batch, context)
        lens = torch.randint(1, context + 1, (batch,), generator=self.gen, device=self.device)
        lens[0], lens[1] = 1, context  # the shortest and the longest context
        lens = lens.to(torch.int32)
        q = self.randn(batch, s.num_heads, s.head_dim)
        ref = paged_decode_attention_ref(q, self.k_cache, self.v_cache, page_table, lens, scale)
        checks = {}
        for label, config, splits in (
            ("default config, heuristic splits", None, None),
            ("default config, 1 split", None, 1),
            ("default config, 7 splits", None, 7),
        ) + tuple((f"config {_label(c)}, 4 splits", c, 4) for c in s.configs):
            out = torch.full_like(q, float("nan"))
            paged_decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                page_table,
                lens,
                scale,
                splits,
                config=config,
                out=out,
            )
            checks[label] = _rel_err(out, ref)
        small_ctx = 50 if self.smoke else 4096  # fp16 / fp32 on a small cache of their own
        small_pages = 4 * -(-small_ctx // s.page_size)
        small_shape = (small_pages, s.page_size, s.num_kv_heads, s.head_dim)
        small_table = torch.randperm(small_pages, device=self.device).view(4, -1).to(torch.int32)
        small_lens = torch.tensor([1, 17, small_ctx - 5, small_ctx], device=self.device)
        small_lens = small_lens.to(torch.int32)
        for dtype in (torch.float16, torch.float32):
            q_small = self.randn(4, s.num_heads, s.head_dim, dtype=dtype)
            kc, vc = self.randn(*small_shape, dtype=dtype), self.randn(*small_shape, dtype=dtype)
            ref_small = paged_decode_attention_ref(q_small, kc, vc, small_table, small_lens, scale)
            out = paged_decode_attention(q_small, kc, vc, small_table, small_lens, scale, 3)
            checks[f"{dtype}, 4 seqs, 3 splits"] = _rel_err(out, ref_small)
        n = small_pages * s.page_size // 2
        kc, vc = self.randn(*small_shape), self.randn(*small_shape)
        slots = torch.randperm(small_pages * s.page_size, device=self.device)[:n]
        k_new = self.randn(n, s.num_kv_heads, s.head_dim)
        v_new = self.randn(n, s.num_kv_heads, s.head_dim)
        k_ref, v_ref = kc.clone(), vc.clone()
        store_kv_ref(k_ref, v_ref, k_new, v_new, slots)
        store_kv(kc, vc, k_new, v_new, slots)
        store_ok = torch.equal(k_ref, kc) and torch.equal(v_ref, vc)
        self.say("\n## Correctness (relative Frobenius error vs the fp32 torch reference)\n")
        self.say(
            f"decode: batch {batch}, ragged contexts 1..{context}, random page table, "
            "output poisoned with NaN first"
        )
        for label, err in checks.items():
            self.say(f"- {label}: {err:.2e}")
        self.say(f"- store_kv: {'identical' if store_ok else 'MISMATCH'} to store_kv_ref")
        self.results["correctness"] = {**checks, "store_kv_identical": store_ok}

    def main_case(self):
        s = self.setup
        batch, context = s.main
        page_table, lens = self.paged_batch(batch, context)
        q = self.randn(batch, s.num_heads, s.head_dim)
        return q, page_table, lens, self.decode_bytes(batch, context)

    def decode_headline(self, copy_tbps: float) -> None:
        s = self.setup
        batch, context = s.main
        q, page_table, lens, nbytes = self.main_case()
        splits = choose_num_splits(
            batch, s.num_kv_heads, context, _num_sms(self.device), DecodeKernelConfig()
        )
        self.say(
            f"\n## Decode, batch {batch} x {context} context, {s.num_heads} q / "
            f"{s.num_kv_heads} KV heads x {s.head_dim}, bf16, page {s.page_size}, random "
            f"page table\n\nbytes per call: {nbytes / 1e9:.3f} GB (K+V once, q, out); default "
            f"config {_label(DecodeKernelConfig())}, heuristic splits {splits}\n"
        )
        times = [self.time_ms(self.decode_fn(q, page_table, lens), 300) for _ in range(2)]
        for ms in times:
            tbps = nbytes / ms / 1e9
            self.say(
                f"**{ms:.4f} ms, {tbps:.2f} TB/s = {100 * tbps / copy_tbps:.1f}% of the copy "
                "bandwidth**"
            )
        self.say("\n| splits | ms | TB/s | % of copy |")
        self.say("|---|---|---|---|")
        scan = {}
        for sp in FINE_SPLITS if not self.smoke else (1, 2):
            ms = self.time_ms(self.decode_fn(q, page_table, lens, None, sp))
            scan[sp] = ms
            tbps = nbytes / ms / 1e9
            self.say(f"| {sp} | {ms:.4f} | {tbps:.2f} | {100 * tbps / copy_tbps:.1f} |")
        self.results["decode_main"] = {
            "ms": times,
            "fraction_of_copy": [nbytes / ms / 1e9 / copy_tbps for ms in times],
            "splits": splits,
            "split_scan_ms": scan,
        }

    def decode_sweep(self, copy_tbps: float) -> None:
        s = self.setup
        q, page_table, lens, nbytes = self.main_case()
        self.say("\n## Decode kernel configurations on the headline case\n")
        self.say("| block_n | warps | stages | splits | ms | TB/s | % of copy |")
        self.say("|---|---|---|---|---|---|---|")
        rows = []
        for config in s.configs:
            for splits in s.splits:
                ms = self.time_ms(self.decode_fn(q, page_table, lens, config, splits), 50)
                rows.append((config.block_n, config.num_warps, config.num_stages, splits, ms))
                tbps = nbytes / ms / 1e9
                self.say(
                    f"| {config.block_n} | {config.num_warps} | {config.num_stages} | "
                    f"{splits} | {ms:.4f} | {tbps:.2f} | {100 * tbps / copy_tbps:.1f} |"
                )
        self.results["decode_sweep"] = rows

    def decode_sizes(self, copy_tbps: float) -> None:
        s = self.setup
        scale = s.head_dim**-0.5
        self.say(
            "\n## Decode across sizes (default config: heuristic splits, and the best of splits "
            f"{SIZE_SPLITS}; torch SDPA with enable_gqa on contiguous KV)\n"
        )
        self.say(
            "| batch | context | GB | ours ms | ours TB/s | % copy | splits | best ms "
            "| best splits | SDPA ms | SDPA TB/s |"
        )
        self.say("|---|---|---|---|---|---|---|---|---|---|---|")
        table = []
        for batch, context in s.sweep:
            page_table, lens = self.paged_batch(batch, context)
            q = self.randn(batch, s.num_heads, s.head_dim)
            nbytes = self.decode_bytes(batch, context)
            ms = self.time_ms(self.decode_fn(q, page_table, lens))
            splits = choose_num_splits(
                batch, s.num_kv_heads, context, _num_sms(self.device), DecodeKernelConfig()
            )
            best_ms, best_splits = min(
                (self.time_ms(self.decode_fn(q, page_table, lens, None, sp)), sp)
                for sp in (SIZE_SPLITS if not self.smoke else (1, 2))
            )
            k = self.randn(batch, s.num_kv_heads, context, s.head_dim)  # [B, Hkv, T, D]
            v = self.randn(batch, s.num_kv_heads, context, s.head_dim)
            q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
            try:
                sdpa_ms = self.time_ms(
                    lambda q4=q4, k=k, v=v: F.scaled_dot_product_attention(
                        q4, k, v, scale=scale, enable_gqa=True
                    )
                )
            except torch.OutOfMemoryError:
                sdpa_ms = float("nan")
                torch.cuda.empty_cache()
            del k, v
            row = (
                batch,
                context,
                nbytes / 1e9,
                ms,
                nbytes / ms / 1e9,
                splits,
                best_ms,
                best_splits,
                sdpa_ms,
                nbytes / sdpa_ms / 1e9,
            )
            table.append(row)
            self.say(
                f"| {batch} | {context} | {row[2]:.3f} | {ms:.4f} | {row[4]:.2f} | "
                f"{100 * row[4] / copy_tbps:.1f} | {splits} | {best_ms:.4f} | "
                f"{best_splits} | {sdpa_ms:.4f} | {row[9]:.2f} |"
            )
        self.results["decode_sizes"] = table

    def prefill(self) -> None:
        s = self.setup
        scale = s.head_dim**-0.5
        self.say("\n## Prefill (bf16, one sequence)\n")
        self.say("| case | path | ms | TFLOP/s | rel err vs fp32 ref |")
        self.say("|---|---|---|---|---|")
        rows = []

        def report(case, path, ms, flops, err=None):
            tflops = flops / ms / 1e9
            err_text = "" if err is None else f"{err:.2e}"
            self.say(f"| {case} | {path} | {ms:.3f} | {tflops:.0f} | {err_text} |")
            rows.append((case, path, ms, tflops, err))

        for n in s.prefill_lens:
            pages, _ = self.paged_batch(1, n)
            pages = pages[0]
            q = self.randn(n, s.num_heads, s.head_dim)
            k = self.randn(n, s.num_kv_heads, s.head_dim)
            v = self.randn(n, s.num_kv_heads, s.head_dim)
            slots = (
                pages.long()[:, None] * s.page_size + torch.arange(s.page_size, device=self.device)
            ).flatten()[:n]
            store_kv(self.k_cache, self.v_cache, k, v, slots)
            fn = lambda q=q, k=k, v=v, pages=pages, n=n: paged_prefill_attention(  # noqa: E731
                q, self.k_cache, self.v_cache, pages, n, scale, k, v
            )
            err = (
                _rel_err(
                    fn(),
                    paged_prefill_attention_ref(q, self.k_cache, self.v_cache, pages, n, scale),
                )
                if n <= 8 * K
                else None
            )
            flops = 4 * s.num_heads * s.head_dim * n * (n + 1) / 2
            report(f"{n} tokens, no prefix", "ours: SDPA is_causal", self.time_ms(fn), flops, err)
        for prefix in s.prefixes:
            n, ctx = s.chunk, prefix + s.chunk
            pages, _ = self.paged_batch(1, ctx)
            pages = pages[0]
            q = self.randn(n, s.num_heads, s.head_dim)
            flops = 4 * s.num_heads * s.head_dim * n * (prefix + (n + 1) / 2)
            case = f"{n} chunk over {prefix} prefix"
            new = lambda q=q, pages=pages, ctx=ctx: paged_prefill_attention(  # noqa: E731
                q, self.k_cache, self.v_cache, pages, ctx, scale
            )
            err = None
            if prefix <= 32 * K:  # the fp32 reference's mask path needs ~140 GB at 128K
                ref = paged_prefill_attention_ref(q, self.k_cache, self.v_cache, pages, ctx, scale)
                err = _rel_err(new(), ref)
                del ref
            path = "ours: gather, cuDNN prefix + causal chunk, LSE merge"
            report(case, path, self.time_ms(new), flops, err)
            k = gather_pages(self.k_cache, pages, ctx)  # [T, Hkv, D]
            v = gather_pages(self.v_cache, pages, ctx)
            qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, len, D]
            bias = causal_lower_right(n, ctx)
            lower_right = lambda qt=qt, kt=kt, vt=vt, bias=bias: F.scaled_dot_product_attention(  # noqa: E731
                qt, kt, vt, attn_mask=bias, scale=scale, enable_gqa=True
            )
            report(
                case,
                "SDPA causal_lower_right (FA2; our fallback)",
                self.time_ms(lower_right),
                flops,
            )
            gather_ms = self.time_ms(
                lambda pages=pages, ctx=ctx: (
                    gather_pages(self.k_cache, pages, ctx),
                    gather_pages(self.v_cache, pages, ctx),
                )
            )
            self.say(f"| {case} | (of which the K/V gather) | {gather_ms:.3f} | | |")
            rows_ = torch.arange(n, device=self.device)[:, None] + prefix
            mask = torch.arange(ctx, device=self.device)[None, :] <= rows_  # [n, T]
            masked = lambda qt=qt, kt=kt, vt=vt, mask=mask: F.scaled_dot_product_attention(  # noqa: E731
                qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True
            )
            report(case, "SDPA explicit bool mask (bf16)", self.time_ms(masked), flops)
            del k, v, qt, kt, vt, mask
            if prefix <= 32 * K:
                ms = self.time_ms(
                    lambda q=q, pages=pages, ctx=ctx: paged_prefill_attention_ref(
                        q, self.k_cache, self.v_cache, pages, ctx, scale
                    ),
                    50,
                )
                report(case, "previous backend: fp32 reference", ms, flops)
        self.results["prefill"] = rows


def _label(config: DecodeKernelConfig) -> str:
    return f"block_n {config.block_n} / {config.num_warps} warps / {config.num_stages} stages"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=(),
        choices=("headline", "sweep", "sizes", "prefill"),
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    reuse_cudnn_plans_across_lengths()  # as the engines do
    bench = Bench(SMOKE if args.smoke else H200, device, args.smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    bench.say(
        f"# Dense attention bench — {name}, torch {torch.__version__}, triton "
        f"{triton.__version__}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
    )
    copy_tbps = bench.copy_bandwidth()
    bench.check_correctness()
    sections = {
        "headline": lambda: bench.decode_headline(copy_tbps),
        "sweep": lambda: bench.decode_sweep(copy_tbps),
        "sizes": lambda: bench.decode_sizes(copy_tbps),
        "prefill": bench.prefill,
    }
    for name, run in sections.items():
        if name in args.skip:
            continue
        try:
            run()
        except Exception as exc:  # keep the other sections' numbers
            bench.say(f"\n**{name} failed: {exc!r}**")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.md").write_text("\n".join(bench.log) + "\n")
    (out / "decode_attention.json").write_text(json.dumps(bench.results, indent=1, default=str))


if __name__ == "__main__":
    main()
