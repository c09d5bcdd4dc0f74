"""Bytes of the HBM residency page tables: spin-ray's two-level tables against a flat table.

Builds the real `ResidencyTable` on the CPU, makes each (request, layer, KV head) hold its
full working set (mandatory pages × (1 + buffer_ratio), the defaults of `SparseConfig`) and
reports the bytes it allocated, for three placements of those pages inside the context:
one contiguous run (best case), runs of 8 pages at random offsets, and uniformly random pages
(worst case). A flat table holds one int32 per (request, layer, head, page of the context).

    python bench/sparse_metadata.py --shape llama-3.1-8b --context 131072 --requests 32
"""

from __future__ import annotations

import argparse

import torch

from spin_ray.models.named_shapes import named_shape_arch
from spin_ray.sparse.budget import PageBudget
from spin_ray.sparse.config import SparseConfig
from spin_ray.sparse.residency import ResidencyTable


def working_set_pages(context: int, page_size: int) -> int:
    config = SparseConfig()
    budget = PageBudget.from_config(config, page_size, index_unit_pages=1)
    return budget.target_pages(context)


def placement(kind: str, num: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    """`num` distinct logical pages of a context of `num_pages` pages."""
    if kind == "contiguous":
        return torch.arange(num)
    if kind == "runs-of-8":
        starts = torch.randperm(num_pages // 8, generator=gen)[: -(-num // 8)] * 8
        return (starts[:, None] + torch.arange(8)).flatten()[:num]
    return torch.randperm(num_pages, generator=gen)[:num]


def measure(layers, heads, requests, context, page_size, segment_pages, kind) -> int:
    num_pages = context // page_size
    per_head = working_set_pages(context, page_size)
    slots = requests * per_head
    table = ResidencyTable(layers, heads, slots, segment_pages, 64, "cpu")
    table.ensure_rows(requests)
    table.ensure_pages(num_pages)
    gen = torch.Generator().manual_seed(0)
    for r in range(requests):
        table.assign_slots(list(range(r * per_head, (r + 1) * per_head)), row=r)
    for layer in range(layers):
        heads_idx, slots_idx, pages_idx = [], [], []
        for r in range(requests):
            for h in range(heads):
                pages = placement(kind, per_head, num_pages, gen)
                heads_idx.append(torch.full((per_head,), h))
                slots_idx.append(torch.arange(r * per_head, (r + 1) * per_head))
                pages_idx.append(pages)
        table.insert(layer, torch.cat(heads_idx), torch.cat(slots_idx), torch.cat(pages_idx))
    used = table.segments_in_use * (segment_pages * 4 + 4 + 8)
    return table.directory.numel() * 4 + used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--segment-pages", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    arch = named_shape_arch(args.shape)
    layers = arch.num_layers - SparseConfig().dense_layers
    heads = arch.num_kv_heads
    flat = args.requests * layers * heads * (args.context // args.page_size) * 4
    per_head = working_set_pages(args.context, args.page_size)
    print(
        f"{args.shape}: {layers} offloaded layers x {heads} KV heads, {args.requests} requests x "
        f"{args.context} tokens, page {args.page_size}; working set {per_head} pages per "
        f"(request, layer, head) of {args.context // args.page_size}"
    )
    print("| table | placement | bytes | vs flat |\n|---|---|---:|---:|")
    print(f"| flat int32 | any | {flat / 2**20:.1f} MiB | 1.00 |")
    for seg in args.segment_pages:
        for kind in ("contiguous", "runs-of-8", "uniform"):
            size = measure(layers, heads, args.requests, args.context, args.page_size, seg, kind)
            print(f"| two-level, {seg}-page segments | {kind} | {size / 2**20:.1f} MiB | "
                  f"{size / flat:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
