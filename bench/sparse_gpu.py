"""The sparse path on a GPU, in one run: (1) its Triton kernels against the torch references and
the engine's tokens against dense, (2) the UVA gather's fetch bandwidth against pinned H2D
copies, (3) the HBM buffer's hit rate against `buffer_ratio` on a long-context decode workload.

    python bench/sparse_gpu.py --out results/            # on a CUDA machine
    python bench/sparse_gpu.py --quick --out /tmp/x      # CPU smoke test (interpreter, tiny)

Writes `sparse_gpu.json` and `sparse_gpu.md` under --out.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch


def check_kernels(device: str) -> list[dict]:
    """Each kernel against its reference on random inputs, in bf16 and fp32."""
    from spin_ray.kernels.lru_victims import lru_victims, lru_victims_ref
    from spin_ray.kernels.quest_append import quest_append, quest_append_ref
    from spin_ray.kernels.quest_page_scores import quest_page_scores, quest_page_scores_ref
    from spin_ray.kernels.slot_token_store import store_decode_tokens, store_decode_tokens_ref
    from spin_ray.kernels.sparse_decode_attention import (
        sparse_decode_attention,
        sparse_decode_attention_ref,
    )
    from spin_ray.kernels.sparse_kv_store import store_kv_head_major, store_kv_head_major_ref
    from spin_ray.kernels.uva_gather import gather_pages, gather_pages_ref, uva_device_view

    cuda = device.startswith("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []

    def record(name, dtype, out, ref, tol):
        err = (out.float() - ref.float()).abs().max().item()
        rows.append(dict(kernel=name, dtype=str(dtype).split(".")[-1], max_abs_err=err,
                         ok=bool(err <= tol)))  # fmt: skip

    def host(shape, dtype):  # a pinned host tensor and the view kernels address
        t = torch.randn(shape, generator=gen).to(dtype)
        if not cuda:
            return t, t
        t = t.pin_memory()
        return t, uva_device_view(t)

    dtypes = (torch.bfloat16, torch.float32) if cuda else (torch.float32,)
    heads, s, d = (8, 16, 128) if cuda else (2, 16, 16)
    for dtype in dtypes:
        pages = 64
        # KV store straight into (pinned) host pages
        k_host, k_view = host((pages, heads, s, d), dtype)
        v_host, v_view = host((pages, heads, s, d), dtype)
        k_ref, v_ref = k_host.clone(), v_host.clone()
        n = 100
        k = torch.randn(n, heads, d, generator=gen).to(dtype)
        v = torch.randn(n, heads, d, generator=gen).to(dtype)
        slots = torch.randperm(pages * s, generator=gen)[:n]
        store_kv_head_major_ref(k_ref, v_ref, k, v, slots)
        store_kv_head_major(k_view, v_view, k.to(device), v.to(device), slots.to(device))
        if cuda:
            torch.cuda.synchronize()
        record("store_kv_head_major (into pinned host)", dtype, k_host, k_ref, 0.0)
        # UVA gather from host pages into GPU slots
        m = 300
        src = torch.randint(0, pages, (m,), generator=gen)
        head = torch.randint(0, heads, (m,), generator=gen)
        dst = torch.randperm(m, generator=gen)
        dk = torch.zeros(heads, m, s, d, dtype=dtype)
        dv = torch.zeros_like(dk)
        gather_pages_ref(k_host, v_host, dk, dv, src, head, dst)
        gk, gv = dk.new_zeros(dk.shape).to(device), dv.new_zeros(dv.shape).to(device)
        gather_pages(k_view, v_view, gk, gv, src.to(device), head.to(device), dst.to(device))
        record("gather_pages (UVA from pinned host)", dtype, gk.cpu(), dk, 0.0)
        # sparse decode attention over per-head slot lists
        b, hq, entries = 6, 4 * heads, 40
        q = torch.randn(b, hq, d, generator=gen).to(dtype)
        slot_ids = torch.randint(-1, m, (b, heads, entries), generator=gen)
        slot_ids[:, :, 0] = 0
        context_lens = torch.randint(1, 2 * entries * s, (b,), generator=gen)
        last_page = (context_lens - 1) // s  # [B]  lists hold partial last pages too
        page_ids = torch.rand(slot_ids.shape, generator=gen) * (last_page + 1)[:, None, None]
        page_ids = torch.where(slot_ids >= 0, page_ids.long(), -1)  # [B, heads, entries]
        page_ids[:, :, 0] = last_page[:, None]
        ref = sparse_decode_attention_ref(q, dk, dv, slot_ids, page_ids, context_lens, d**-0.5)
        out = sparse_decode_attention(
            q.to(device), gk, gv, slot_ids.to(device), page_ids.to(device),
            context_lens.to(device), d**-0.5,
        )  # fmt: skip
        record(
            "sparse_decode_attention",
            dtype,
            out.cpu(),
            ref,
            2e-2 if dtype != torch.float32 else 1e-4,
        )
        # Quest page scores
        kmin = torch.randn(pages, heads, d, generator=gen).to(dtype)
        kmax = (kmin.float() + torch.rand(pages, heads, d, generator=gen)).to(dtype)
        table = torch.randint(0, pages, (b, 200), generator=gen, dtype=torch.int32)
        ends = torch.randint(0, 201, (b,), generator=gen)  # pages past a row's end: -inf
        ref = quest_page_scores_ref(q, kmin, kmax, table, ends)
        out = quest_page_scores(q.to(device), kmin.to(device), kmax.to(device), table.to(device),
                                ends.to(device))  # fmt: skip
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(out.cpu()), finite), "quest_page_scores: -inf pattern"
        record("quest_page_scores", dtype, out.cpu()[finite], ref[finite],
               1e-1 if dtype != torch.float32 else 1e-3)  # fmt: skip
        # Quest summaries folded in: a prefill chunk from mid-page, padding, decodes
        chunk = torch.arange(3 * s + 5, 3 * s + 5 + 37)  # pages 3..5, starting mid-page
        decodes = torch.tensor([9 * s, 12 * s + 7, 20 * s + s - 1])  # fresh, mid, last row
        slots = torch.cat([decodes, chunk, torch.full((3,), -1)])  # [N] int64
        k = torch.randn(len(slots), heads, d, generator=gen).to(dtype)
        got = [kmin.clone(), kmax.clone()]  # [P, heads, d]: the last row is the spare
        quest_append_ref(kmin, kmax, slots, k, s)
        got = [t.to(device) for t in got]
        quest_append(got[0], got[1], slots.to(device), k.to(device), s)
        for name, out, ref in (("min", got[0], kmin), ("max", got[1], kmax)):
            record(f"quest_append ({name})", dtype, out[:-1].cpu(), ref[:-1], 0.0)
        # decode tokens stored into the slot of their last page (padding: the scratch slot)
        last_page = torch.tensor([2, 7, -2])  # row 2 is padding
        last_offset = torch.tensor([3, 15, 0])
        listed = torch.stack([torch.randperm(8, generator=gen) for _ in range(3 * heads)])
        listed = listed.view(3, heads, 8)  # [B, heads, 8] pages 0..7, any order
        slot_of = torch.randperm(m - 1, generator=gen)[: listed.numel()].view_as(listed)
        k, v = (torch.randn(3, heads, d, generator=gen).to(dtype) for _ in range(2))
        ref_k, ref_v = dk.clone(), dv.clone()
        store_decode_tokens_ref(ref_k, ref_v, listed, slot_of, last_page, last_offset, m - 1, k, v)
        out_k, out_v = dk.to(device), dv.to(device)
        store_decode_tokens(
            out_k, out_v, listed.to(device), slot_of.to(device), last_page.to(device),
            last_offset.to(device), m - 1, k.to(device), v.to(device),
        )  # fmt: skip
        record("store_decode_tokens", dtype, torch.cat([out_k, out_v]).cpu(),
               torch.cat([ref_k, ref_v]), 0.0)  # fmt: skip
    # partition top-k over a wide score table whose rows select in [start, length): one row
    # per register block the kernel picks at run time (1/8, 1/2, all of 8192), the scores
    # outside finite and large (never to be chosen)
    from spin_ray.kernels.partition_topk import partition_topk, partition_topk_ref

    scores = torch.randn(3, 8, 8192, generator=gen)
    starts, lengths = torch.tensor([0, 30, 100]), torch.tensor([700, 3000, 8192])
    for row, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        scores[row, :, :a] = 1e6
        scores[row, :, n:] = 1e6
    k = torch.full((3, 8), 120)
    ref = partition_topk_ref(scores, k, 128, lengths, starts).sort(-1).values
    out = partition_topk(scores.to(device), k.to(device), 128, lengths.to(device),
                         starts.to(device))  # fmt: skip
    record("partition_topk (row starts, lengths)", "fp32", out.sort(-1).values.cpu().float(),
           ref.float(), 0.0)  # fmt: skip
    keys = torch.randint(0, 66, (64, 900), generator=gen, dtype=torch.uint8)
    need = torch.randint(0, 900, (64,), generator=gen)
    ref = lru_victims_ref(keys, need, 66)
    out = lru_victims(keys.to(device), need.to(device), 66)
    record("lru_victims", "uint8", out.cpu().float(), ref.float(), 0.0)
    return rows


def check_engine_tokens(device: str, quick: bool) -> list[dict]:
    """spin-tiny in fp32: every algorithm and mode at a budget covering the context generates
    the dense engine's tokens (exercises the async offload, UVA gather, LRU and attention;
    prompts prefill in 512-token chunks, so later chunks read their prefix back ahead of each
    layer and decodes of earlier prompts run beside them as split graph steps)."""
    from spin_ray import LLM, SamplingParams
    from spin_ray.sparse import SparseConfig
    from spin_ray.sparse.presets import preset

    lengths = (90, 200, 333) if quick else (300, 900, 1500, 2100)
    prompts = [
        {"prompt_token_ids": [(i * 31 + j * 17) % 250 + 3 for j in range(n)]}
        for i, n in enumerate(lengths)
    ]
    params = SamplingParams(max_tokens=12 if quick else 32, temperature=0.0, ignore_eos=True)
    common = dict(model="spin-tiny", device=device, dtype="float32", progress=False,
                  max_num_batched_tokens=512)  # fmt: skip
    dense = LLM(**common)
    want = [o.outputs[0].token_ids for o in dense.generate(prompts, params, use_tqdm=False)]
    del dense
    kv_tokens = sum(lengths) + len(lengths) * 32
    rows = []
    cases = [(a, "spin") for a in ("full", "quest", "shadowkv", "retroinfer", "seer")]
    cases += [("quest", "sparse-naive"), ("quest", "dense-offload"), ("quest", "spin+lookahead")]
    for algorithm, mode in cases:
        spin = SparseConfig(
            algorithm=algorithm,
            lookahead=mode.endswith("+lookahead"),
            token_budget=1.0,
            dense_layers=1,
            cpu_cache_tokens=2 * kv_tokens,
            gpu_cache_tokens=kv_tokens // 2 if mode.startswith("spin") else 2 * kv_tokens,
        )
        llm = LLM(**common, sparse=preset(mode.removesuffix("+lookahead"), spin))
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.check_integrity()
        same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
        stats = llm.kv_stats()
        rows.append(dict(algorithm=algorithm, mode=mode, tokens_equal=same,
                         tokens=sum(len(w) for w in want), hit_rate=stats.hit_rate))  # fmt: skip
        del llm
    # lookahead with a small budget and small buffers (both retrievals evict): the same tokens
    # as without it, since each layer still attends over its own selection
    small = dict(**common, sparse="quest", token_budget=128, dense_layers=1, buffer_ratio=1.0,
                 cpu_cache_tokens=2 * kv_tokens, gpu_cache_tokens=kv_tokens // 2)  # fmt: skip
    runs = {}
    for lookahead, share in ((False, None), (True, None), (True, 0.5)):
        llm = LLM(**small, lookahead=lookahead, lookahead_share=share)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.llm_engine.check_integrity()
        runs[lookahead, share] = got, llm.kv_stats().hit_rate
        del llm
    # the fused retrieval kernels against their torch reference (fused_retrieve=False), small
    # buffers (ratio 1: rows of 16 slots) and large (15: up to 128 slots, lists padded to the
    # largest buffer, so rows run in different register blocks)
    for ratio in (1.0, 15.0):
        paths = {}
        for fused in (True, False):
            llm = LLM(**dict(small, buffer_ratio=ratio), fused_retrieve=fused)
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            llm.llm_engine.check_integrity()
            paths[fused] = got, llm.kv_stats()
            del llm
        (got, fused), (ref, plain_torch) = paths[True], paths[False]
        counters = [(s.lookups, s.hits, s.evictions) for s in (fused, plain_torch)]
        rows.append(dict(
            algorithm=f"quest (budget 128, buffer ratio {ratio:g}, vs torch retrieval)",
            mode="spin", tokens_equal=sum(a == b for g, w in zip(got, ref) for a, b in zip(g, w)),
            tokens=sum(len(w) for w in ref), hit_rate=fused.hit_rate,
            same_counters=counters[0] == counters[1],
        ))  # fmt: skip
    plain = runs[False, None][0]
    for (lookahead, share), (got, hit_rate) in runs.items():
        if lookahead:
            same = sum(a == b for g, w in zip(got, plain) for a, b in zip(g, w))
            mode = "spin+lookahead" + (f" (share {share})" if share else "")
            rows.append(dict(algorithm="quest (budget 128, vs spin without lookahead)",
                             mode=mode, tokens_equal=same,
                             tokens=sum(len(w) for w in plain), hit_rate=hit_rate))  # fmt: skip
    return rows


def measure_bandwidth(device: str) -> list[dict]:
    """GB/s of the UVA gather kernel moving random (page, head) runs of K and V out of pinned
    host memory, against a pinned → device copy of one contiguous buffer in the same run."""
    from spin_ray.kernels.uva_gather import gather_pages, uva_device_view

    def timed(fn, *args, reps=5):
        fn(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    def copy(dst, src):
        dst.copy_(src, non_blocking=True)

    def index(view, idx):
        return view[idx, 0]

    total = 2 * 2**30  # bytes moved per measurement (K + V)
    src = torch.empty(total // 2, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(total // 2, dtype=torch.uint8, device=device)
    h2d = (total // 2) / timed(copy, dst, src)
    del src, dst
    rows = [dict(path="pinned H2D copy, 1 GiB contiguous", run_kib=1048576.0, gbps=h2d / 1e9,
                 fraction_of_h2d=1.0)]  # fmt: skip
    heads, d = 8, 128
    for page_size in (16, 64, 256):  # runs of 4, 16, 64 KiB (bf16)
        run = page_size * d * 2
        host_pages = (4 * 2**30) // (heads * run * 2)  # a 4 GiB CPU tier (K + V)
        shape = (host_pages, heads, page_size, d)
        k_host = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        v_host = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        k_view, v_view = uva_device_view(k_host), uva_device_view(v_host)
        slots = (total // 2) // run // heads
        items = slots * heads  # every (head, slot) of the GPU tier once, from a random page
        k_dst = torch.empty((heads, slots, page_size, d), dtype=torch.bfloat16, device=device)
        v_dst = torch.empty_like(k_dst)
        gen = torch.Generator().manual_seed(page_size)
        src_page = torch.randint(0, host_pages, (items,), generator=gen).to(device)
        head = torch.arange(heads, device=device).repeat_interleave(slots)
        dst_slot = torch.arange(slots, device=device).repeat(heads)
        seconds = timed(gather_pages, k_view, v_view, k_dst, v_dst, src_page, head, dst_slot)
        gbps = total / seconds / 1e9
        rows.append(dict(path=f"UVA gather kernel, {run // 1024} KiB runs", run_kib=run / 1024,
                         gbps=gbps, fraction_of_h2d=gbps * 1e9 / h2d))  # fmt: skip
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for programs in (sms // 4, sms // 2, sms) if page_size == 16 else ():  # lookahead's grid
            seconds = timed(gather_pages, k_view, v_view, k_dst, v_dst, src_page, head, dst_slot,
                            programs)  # fmt: skip
            gbps = total / seconds / 1e9
            path = f"UVA gather kernel, {run // 1024} KiB runs, {programs} programs"
            rows.append(dict(path=path, run_kib=run / 1024, gbps=gbps,
                             fraction_of_h2d=gbps * 1e9 / h2d))  # fmt: skip
        idx = src_page[: items // 4]
        seconds = timed(index, k_view, idx)  # torch indexing through the same view
        moved = idx.numel() * run
        rows.append(dict(path=f"torch index on UVA view, {run // 1024} KiB runs",
                         run_kib=run / 1024, gbps=moved / seconds / 1e9,
                         fraction_of_h2d=moved / seconds / h2d))  # fmt: skip
        del k_host, v_host, k_view, v_view, k_dst, v_dst
    return rows


def measure_hit_rate(device: str, quick: bool, deadline: float, workload: tuple) -> list[dict]:
    """Decode a long-context batch with Quest at several `buffer_ratio`s (and sparse-naive,
    no buffer); hit rate and PCIe bytes over the decode steps after the first."""
    from spin_ray import SamplingParams
    from spin_ray.engine.llm_engine import LLMEngine
    from spin_ray.llm import LLM

    model = "spin-tiny" if quick else "llama-3.2-1b"
    num, prompt_len, steps = (3, 600, 24) if quick else workload
    budget = 128 if quick else 2048
    ratios = (1.0, 4.0) if quick else (1.0, 2.0, 4.0, 5.0, 8.0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (prompt_len,), generator=gen).tolist() for _ in range(num)]
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    rows = []
    for mode, ratio in [("sparse-naive", 0.0)] + [("spin", r) for r in ratios]:  # 0: no buffer
        if time.monotonic() > deadline:
            rows.append(dict(mode=mode, buffer_ratio=ratio, skipped="time limit"))
            continue
        llm = LLM(
            model=model,
            device=device,
            progress=False,
            sparse="quest",
            tiers=mode,
            token_budget=budget,
            buffer_ratio=ratio,
            max_model_len=prompt_len + steps,
            max_num_seqs=num,
            cpu_cache_tokens=num * (prompt_len + steps + 64),
            gpu_cache_tokens=(12 if quick else 10) * num * budget,
        )
        engine: LLMEngine = llm.llm_engine
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
        first = None
        step_times = []
        while engine.has_unfinished_requests():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs = engine.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if first is not None:
                step_times.append(time.perf_counter() - t0)
            if (
                first is None
                and outputs
                and all(len(o.outputs[0].token_ids) >= 2 for o in outputs)
                and len(outputs) == num
            ):
                first = engine.kv_stats()  # after the first full decode step
        end = engine.kv_stats()
        if first is None:
            raise RuntimeError("no decode step with every request found")
        lookups = end.lookups - first.lookups
        hits = end.hits - first.hits
        decode_steps = len(step_times)
        rows.append(dict(
            mode=mode,
            buffer_ratio=ratio,
            hit_rate=hits / lookups if lookups else 0.0,
            h2d_mib_per_step=(end.h2d_bytes - first.h2d_bytes) / decode_steps / 2**20,
            evictions_per_step=(end.evictions - first.evictions) / decode_steps,
            decode_step_ms=1e3 * sum(step_times) / decode_steps,
            select_ms_per_step=1e3 * (end.select_time_s - first.select_time_s) / decode_steps,
            fetch_ms_per_step=1e3 * (end.fetch_time_s - first.fetch_time_s) / decode_steps,
            attention_ms_per_step=1e3 * (end.attention_time_s - first.attention_time_s)
            / decode_steps,
        ))  # fmt: skip
        del engine, llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test")
    parser.add_argument("--time-limit", type=float, default=330.0, help="seconds for it all")
    parser.add_argument(
        "--hit-workload", type=int, nargs=3, default=[8, 16384, 64],
        metavar=("REQUESTS", "PROMPT", "STEPS"), help="hit-rate decode workload",
    )  # fmt: skip
    parser.add_argument(
        "--sections", nargs="+", default=["kernels", "tokens", "bandwidth", "hitrate"]
    )
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    sections = {
        "kernels": lambda: check_kernels(device),
        "tokens": lambda: check_engine_tokens(device, args.quick),
        "bandwidth": lambda: measure_bandwidth(device) if device == "cuda" else [],
        "hitrate": lambda: measure_hit_rate(device, args.quick, deadline, tuple(args.hit_workload)),
    }
    for name in args.sections:
        t0 = time.monotonic()
        try:
            results[name] = sections[name]()
        except Exception:  # keep going: one broken section must not hide the others
            results[name] = [dict(error=traceback.format_exc()[-2000:])]
        results[f"{name}_seconds"] = round(time.monotonic() - t0, 1)
        print(name, results[f"{name}_seconds"], "s", flush=True)
        print(_table(results[name]), flush=True)
        (args.out / "sparse_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    md = [f"device {results['device']}, torch {results['torch']}, {results['date']}\n"]
    for name in args.sections:
        md.append(f"### {name} ({results[f'{name}_seconds']} s)\n\n{_table(results[name])}")
    (args.out / "sparse_gpu.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
