"""Launch shapes of two of spin's per-layer decode kernels, timed at the bench's decode shape
(`longbenchdecode` at seed 2, budget 1,024: 9 requests of ~58K tokens in a CUDA graph of 16
rows, a page table 8,192 pages wide), each variant checked against the torch reference:

- `quest_page_scores`: pages per program (`block_pages`) and warps — its grid covers the
  table's whole width for all 16 rows, so most programs are past a row's end and only fill;
- `sparse_decode_attention`: pages per split program (`entries_per_split`), whose loop waits
  for one page's loads per iteration.

    python bench/decode_kernel_variants.py              # on a CUDA machine
    python bench/decode_kernel_variants.py --quick      # CPU smoke test (TRITON_INTERPRET=1)

Prints a Markdown table per kernel: median µs per launch (triton's do_bench) and that × the
30 sparse layers of a step.
"""

from __future__ import annotations

import argparse
import functools
import itertools
from dataclasses import dataclass

import torch
from triton.testing import do_bench

from spin_ray.bench.report import markdown_table
from spin_ray.kernels.quest_page_scores import quest_page_scores, quest_page_scores_ref
from spin_ray.kernels.sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_ref,
)

SPARSE_LAYERS = 30
"""Layers of Llama-3.1-8B past spin's two dense ones: launches of each kernel per step."""


@dataclass(frozen=True)
class DecodeShape:
    rows: int = 16  # the graph's batch (9 live, 7 padding)
    live_rows: int = 9
    pages_per_row: int = 3625  # 58,000 tokens of 16
    table_width: int = 8192  # pages: max_model_len 110,000 rounded up
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    entries: int = 72  # listed pages per (row, KV head): 1,024 tokens of top-k + sink/local
    dtype: torch.dtype = torch.bfloat16


QUICK = DecodeShape(rows=4, live_rows=3, pages_per_row=50, table_width=64, q_heads=4,
                    kv_heads=2, head_dim=16, entries=9, dtype=torch.float32)  # fmt: skip


def quest_variants(shape: DecodeShape, device: str, timed: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    s = shape
    num_pages = s.live_rows * s.pages_per_row
    q = torch.randn(s.rows, s.q_heads, s.head_dim, generator=gen).to(s.dtype)
    kmin = torch.randn(num_pages, s.kv_heads, s.head_dim, generator=gen).to(s.dtype)
    kmax = (kmin.float() + torch.rand(kmin.shape, generator=gen)).to(s.dtype)
    table = torch.zeros(s.rows, s.table_width, dtype=torch.int32)
    ends = torch.zeros(s.rows, dtype=torch.int64)  # padding rows: no pages
    for r in range(s.live_rows):
        table[r, : s.pages_per_row] = torch.arange(r * s.pages_per_row, (r + 1) * s.pages_per_row)
        ends[r] = s.pages_per_row
    args = [t.to(device) for t in (q, kmin, kmax, table, ends)]
    ref = quest_page_scores_ref(*args).cpu()
    rows = []
    for block, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
        run = functools.partial(quest_page_scores, *args, block_pages=block, num_warps=warps)
        out = run().cpu()
        finite = torch.isfinite(ref)
        err = (out[finite] - ref[finite]).abs().max().item()
        ok = torch.equal(torch.isfinite(out), finite) and err <= _tolerance(s.dtype, 1e-1, 1e-3)
        rows.append(dict(block_pages=block, num_warps=warps, max_abs_err=err, ok=ok,
                         **_median_us(run, timed)))  # fmt: skip
    return rows


def attention_variants(shape: DecodeShape, device: str, timed: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    s = shape
    num_slots = s.rows * s.entries
    k = torch.randn(s.kv_heads, num_slots, s.page_size, s.head_dim, generator=gen).to(s.dtype)
    v = torch.randn(k.shape, generator=gen).to(s.dtype)
    q = torch.randn(s.rows, s.q_heads, s.head_dim, generator=gen).to(s.dtype)
    context = s.pages_per_row * s.page_size
    heads = s.rows * s.kv_heads  # distinct pages of each (row, head); the context's last partial
    pages = torch.stack([torch.randperm(s.pages_per_row, generator=gen)[: s.entries]
                         for _ in range(heads)]).view(s.rows, s.kv_heads, s.entries)  # fmt: skip
    slots = torch.randperm(num_slots, generator=gen)[None].expand(s.kv_heads, -1)
    slots = slots.reshape(s.kv_heads, s.rows, s.entries).transpose(0, 1).contiguous()
    pages[s.live_rows :] = -1  # padding rows list nothing
    slots = torch.where(pages >= 0, slots, -1)
    lens = torch.full((s.rows,), context - 5, dtype=torch.int64)
    args = [t.to(device) for t in (q, k, v, slots, pages, lens)]
    ref = sparse_decode_attention_ref(*args, 0.088).cpu()
    rows = []
    for per_split in (1, 2, 4, 8, 16):
        run = functools.partial(sparse_decode_attention, *args, 0.088, entries_per_split=per_split)
        err = (run().cpu().float() - ref.float()).abs().max().item()
        ok = err <= _tolerance(s.dtype, 2e-2, 1e-4)
        rows.append(dict(entries_per_split=per_split, max_abs_err=err, ok=ok,
                         **_median_us(run, timed)))  # fmt: skip
    return rows


def _tolerance(dtype: torch.dtype, low_precision: float, fp32: float) -> float:
    """sparse_gpu.py's tolerances against the fp32 references."""
    return fp32 if dtype == torch.float32 else low_precision


def _median_us(fn, timed: bool) -> dict:
    """Median µs per launch and per step (None untimed)."""
    us = do_bench(fn, return_mode="median") * 1e3 if timed else None
    return dict(us=us, us_per_step=None if us is None else us * SPARSE_LAYERS)


_CHECKED = (("max abs err", "max_abs_err", "{:.3g}"), ("ok", "ok", "{}"))
_TIMED = (("µs", "us", "{:.1f}"), ("µs per step", "us_per_step", "{:.0f}"))
QUEST_COLUMNS = (("block_pages", "block_pages", "{}"), ("num_warps", "num_warps", "{}"),
                 *_CHECKED, *_TIMED)  # fmt: skip
ATTENTION_COLUMNS = (("entries_per_split", "entries_per_split", "{}"), *_CHECKED, *_TIMED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, untimed")
    args = parser.parse_args()
    shape, device = (QUICK, "cpu") if args.quick else (DecodeShape(), "cuda")
    if not args.quick:
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"shape: {shape}\n\n### quest_page_scores\n")
    print(markdown_table(quest_variants(shape, device, timed=not args.quick), QUEST_COLUMNS))
    print("\n### sparse_decode_attention\n")
    print(markdown_table(attention_variants(shape, device, timed=not args.quick),
                         ATTENTION_COLUMNS))  # fmt: skip


if __name__ == "__main__":
    main()
