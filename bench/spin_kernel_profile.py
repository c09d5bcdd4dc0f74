"""Where a decode step's time goes: the kernels of a few eager decode steps under
torch.profiler, summed per kernel name; with --graphs, the host side of CUDA-graph steps; with
--prefill, the kernels of the (chunked) prefill steps instead (with --beside N, while N
requests decode: the mixed steps of a loaded server), and the GPU's idle gaps with the host ops
behind the longest; with --prefill --host, no torch profiler: the wall time per step, then
cProfile and the lines that synchronise with the GPU over a second prompt's prefill.

    python bench/spin_kernel_profile.py [--model llama-3.1-8b] [--mode spin] [--sparse quest] \\
        [--prompt-len 2048] [--steps 8] [--token-budget 512] [--graphs | --prefill [--host]]

Builds `LLM(enforce_eager=True)` (eager, so each kernel is seen on its own; a CUDA graph runs
the same kernels), prefills `--batch` random prompts, runs `--warmup-steps` decode steps (2; the
HBM buffer fills over the first steps, so use ~64 for the steady state), then
`--steps` decode steps under the profiler. Prints, per kernel name, its GPU time per step and
launches per step (top 30), and the GPU time per step in all. With --graphs the engine replays
CUDA graphs instead: the wall time of `--steps` decode steps of the whole batch (p50, min, max;
no request finishes or prefills meanwhile: the TPOT at that batch size) and the GPU time of
their graph replays, then the host functions with the most time over 8 more steps under
cProfile, and the lines that synchronise with the GPU over 4 more (--no-async-scheduling: the
engine waits for each step's tokens). Sparse modes also print the HBM hit rate and host -> GPU
bytes of the measured steps. Needs CUDA.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import random
import statistics
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--mode", default="spin", help="dense, spin or sparse-naive")
    parser.add_argument(
        "--sparse", default="quest", help="the sparse modes' algorithm (quest, shadowkv, ...)"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--graphs", action="store_true", help="profile the host of graph steps")
    parser.add_argument(
        "--prefill",
        action="store_true",
        help="profile the prefill steps (chunks of --chunk-tokens) instead of decode steps",
    )
    parser.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per prefill step")
    parser.add_argument(
        "--beside",
        type=int,
        default=0,
        help="--prefill with this many requests of --beside-len tokens decoding meanwhile (the "
        "mixed steps of a loaded server; started, then --warmup-steps decode steps, first)",
    )
    parser.add_argument("--beside-len", type=int, default=None, help="default: --prompt-len")
    parser.add_argument(
        "--host",
        action="store_true",
        help="--prefill: no torch profiler; the wall time per step, then the host functions "
        "(cProfile, by own time) and the lines that wait on the GPU (torch's sync debug mode) "
        "over a second prompt's prefill",
    )
    parser.add_argument(
        "--gpu-cache-tokens",
        type=int,
        default=None,
        help="sparse modes: HBM KV tokens (default: every request's context, twice with "
        "--prefill); e.g. 131072 with --beside 9 at 50K puts their buffers at the floor",
    )
    parser.add_argument(
        "--prefix-from-cpu",
        action="store_true",
        help="--prefill with HBM for half the prompts only: no prefill slots, so every chunk "
        "reads its prefix back from the CPU tier (what a prefill beside full buffers does)",
    )
    parser.add_argument("--buffer-ratio", type=float, default=None, help="spin's HBM buffer")
    parser.add_argument(
        "--lookahead", action="store_true", help="spin: fetch each layer's pages one layer early"
    )
    parser.add_argument(
        "--lookahead-share", type=float, default=None, help="share of the top-k fetched early"
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="the engine's max_model_len (default: the longest request's context): the bench "
        "sets its workload's longest, which fixes the graphs' page-table and slot-list widths",
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's async scheduling (default on; with --graphs a step's wall time is "
        "then the time between two steps' tokens reaching the host)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="the engine's max_num_seqs (default: --batch + --beside): a decode graph batch "
        "runs at its own size up to 16, above it padded to the next multiple of 8",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=2,
        help="decode steps before measuring (the HBM buffer fills over the first ones)",
    )
    args = parser.parse_args()

    from spin_ray import LLM, SamplingParams

    beside_len = args.beside_len or args.prompt_len
    # a request beside the prefill decodes through its warm-up and the whole prefill
    prefills = 2 if args.host else 1
    beside_tokens = (
        args.warmup_steps + prefills * args.batch * (args.prompt_len // args.chunk_tokens + 2) + 8
    )
    prompt_max = args.prompt_len + 3 * args.steps + args.warmup_steps + 32
    beside_max = beside_len + beside_tokens + 32
    max_len = max(prompt_max, beside_max) if args.beside else prompt_max
    max_len = max(max_len, args.max_model_len or 0)
    # every request's own context (9 x 50K beside a 64K prompt: 515K tokens, a 63 GB pinned
    # tier, within the H200 machine's 64 GB), plus slack for page rounding
    tokens = args.batch * prompt_max + args.beside * beside_max + 1024
    sparse = {}
    if args.mode != "dense":
        # --prefill: HBM for the prompt's prefill slots beside the request's buffer
        gpu_tokens = 2 * tokens if args.prefill else tokens
        if args.prefix_from_cpu:
            gpu_tokens = tokens // 2
        gpu_tokens = args.gpu_cache_tokens or gpu_tokens
        sparse = dict(sparse=args.sparse, tiers=args.mode, token_budget=args.token_budget,
                      gpu_cache_tokens=gpu_tokens, cpu_cache_tokens=tokens,
                      buffer_ratio=args.buffer_ratio,
                      lookahead=args.lookahead or None,
                      lookahead_share=args.lookahead_share)  # fmt: skip
    llm = LLM(model=args.model, device="cuda", dtype="bfloat16", enforce_eager=not args.graphs,
              max_num_seqs=args.max_num_seqs or args.batch + args.beside, max_model_len=max_len,
              max_num_batched_tokens=(args.chunk_tokens if args.prefill
                                      else min(args.batch * args.prompt_len, 65536)),
              progress=False, async_scheduling=args.async_scheduling,
              **sparse)  # fmt: skip
    engine = llm.llm_engine
    rng = random.Random(0)
    room = 3 * args.steps + args.warmup_steps + 16  # --graphs: three rounds of steps
    params = SamplingParams(max_tokens=room, temperature=0.0, ignore_eos=True)
    if args.prefill:  # compile the kernels of a prefill over a prefix outside the measurement
        # (with --prefix-from-cpu longer than HBM holds, so the CPU-tier prefix read compiles)
        warm_len = args.chunk_tokens + 16 + (tokens // 2 if args.prefix_from_cpu else 0)
        warm = [rng.randrange(3, 259) for _ in range(min(warm_len, max_len))]
        once = SamplingParams(max_tokens=1, ignore_eos=True)
        engine.add_request("warm-up", {"prompt_token_ids": warm}, once)
        while engine.has_unfinished_requests():
            engine.step()
    if args.beside:  # the decoding requests: prefilled, then decoding when the profile starts
        beside = SamplingParams(max_tokens=beside_tokens, temperature=0.0, ignore_eos=True)
        for i in range(args.beside):
            prompt = [rng.randrange(3, 259) for _ in range(beside_len)]
            engine.add_request(f"beside-{i}", {"prompt_token_ids": prompt}, beside)
        running: set[str] = set()
        while len(running) < args.beside:
            running.update(o.request_id for o in engine.step())
        for _ in range(args.warmup_steps):
            engine.step()
    for i in range(args.batch):
        prompt = [rng.randrange(3, 259) for _ in range(args.prompt_len)]
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    if args.prefill and args.host:
        _profile_prefill_host(engine, args, params, rng)
        return
    if args.prefill:
        _profile_prefill(engine, args)
        return
    started: set[str] = set()
    while len(started) < args.batch:  # prefill (chunked), then the warm-up decode steps
        started.update(o.request_id for o in engine.step())
    for _ in range(args.warmup_steps):
        engine.step()
    torch.cuda.synchronize()
    if args.graphs:
        _profile_host(engine, args.steps)
        return
    before = engine.kv_stats()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    _print_cache(before, engine.kv_stats(), args.steps)
    _print_kernels(prof, args.steps, f"{args.mode}, {args.model}, batch {args.batch} x "
                   f"{args.prompt_len}", "decode step")  # fmt: skip


def _profile_prefill(engine, args) -> None:
    """Wall time and kernels of the steps until every prompt has its first token."""
    before = engine.kv_stats()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:  # CPU too: for the gaps
        steps, wall = _prefill_wall(engine, {str(i) for i in range(args.batch)})
    read = (engine.kv_stats().h2d_bytes - before.h2d_bytes) / 1e9
    print(_prefill_line(args, steps, wall, "under the profiler") + f", {read:.2f} GB host -> GPU "
          "(prefix reads, and the decodes' misses)")  # fmt: skip
    _print_kernels(prof, steps, f"{args.mode}, {args.model}, batch {args.batch} x "
                   f"{args.prompt_len}, chunks of {args.chunk_tokens}", "prefill step")  # fmt: skip
    _print_gaps(prof, steps)


def _prefill_wall(engine, ids: set[str]) -> tuple[int, float]:
    """Steps and wall seconds until every request in `ids` has its first token."""
    torch.cuda.synchronize()
    started: set[str] = set()
    steps, start = 0, time.perf_counter()
    while not ids <= started:
        started.update(o.request_id for o in engine.step())
        steps += 1
    torch.cuda.synchronize()
    return steps, time.perf_counter() - start


def _prefill_line(args, steps: int, wall: float, how: str) -> str:
    beside = f" beside {args.beside} decoding requests" if args.beside else ""
    return (f"prefill of {args.batch} x {args.prompt_len}{beside} in {steps} steps: {wall:.2f} s "
            f"wall ({wall / steps * 1e3:.1f} ms per step, {how})")  # fmt: skip


def _profile_prefill_host(engine, args, params, rng) -> None:
    """Wall time per step of the prefill without a profiler, then the host's own time per
    function over a second, identical prefill under cProfile."""
    steps, wall = _prefill_wall(engine, {str(i) for i in range(args.batch)})
    print(_prefill_line(args, steps, wall, "no profiler"))
    for i in range(args.batch):  # (its pages go back first: the CPU tier holds one prefill)
        engine.abort_request(str(i))
        prompt = [rng.randrange(3, 259) for _ in range(args.prompt_len)]
        engine.add_request(f"again-{i}", {"prompt_token_ids": prompt}, params)
    profile = cProfile.Profile()
    with _sync_lines() as lines:
        profile.enable()
        steps, wall = _prefill_wall(engine, {f"again-{i}" for i in range(args.batch)})
        profile.disable()
    print(f"again, under cProfile: {steps} steps, {wall / steps * 1e3:.1f} ms per step; "
          f"synchronisations per step, by line:")  # fmt: skip
    _print_lines(lines, steps)
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)


def _print_kernels(prof, steps: int, what: str, step_name: str) -> None:
    """Per kernel name: GPU time and launches per step (top 30), and the GPU time in all."""
    rows = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # a host op (with CPU activities recorded): its kernels are listed apart
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = event.self_cuda_time_total
        if us > 0:
            rows.append((us / steps, event.count / steps, event.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{what}: {total / 1e3:.2f} ms GPU per {step_name}")
    print("| kernel | us/step | share | launches/step |")
    print("|---|---:|---:|---:|")
    for us, count, name in rows[:30]:
        print(f"| {name[:90]} | {us:.0f} | {us / total:.1%} | {count:.0f} |")


def _print_gaps(prof, steps: int) -> None:
    """Where the GPU ran nothing: the union of every kernel's, copy's and memset's interval
    over the measured steps, its idle gaps (over 20 us) summed by the kernels either side, and
    for the longest gaps the host ops that overlapped them most (what the GPU waited for)."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = prof.events()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == cuda)  # fmt: skip
    if not spans:
        return
    gaps: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    longest: list[tuple[float, float, str]] = []  # (start, end, pair)
    busy, (start, end, before) = 0.0, spans[0]
    for s, e, name in spans[1:]:
        if s > end + 20:
            pair = f"{before[:50]} -> {name[:50]}"
            gaps[pair] += s - end
            counts[pair] += 1
            longest.append((end, s, pair))
        if s > end:
            busy += end - start
            start = s
        if e > end:
            end, before = e, name
    busy += end - start
    span = spans[-1][1] - spans[0][0]
    print(f"GPU busy {busy / steps / 1e3:.1f} ms of {span / steps / 1e3:.1f} ms per step "
          f"(first to last kernel); idle gaps over 20 us, by the kernels either side:")  # fmt: skip
    print("| before -> after | ms/step | gaps/step |")
    print("|---|---:|---:|")
    for pair, us in gaps.most_common(15):
        print(f"| {pair} | {us / steps / 1e3:.2f} | {counts[pair] / steps:.1f} |")
    host = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == cpu]  # fmt: skip
    for g0, g1, pair in sorted(longest, key=lambda g: g[0] - g[1])[:6]:
        print(f"gap of {(g1 - g0) / 1e3:.2f} ms ({pair}); host ops overlapping it most:")
        over = sorted(((min(e, g1) - max(s, g0), e - s, name) for s, e, name in host
                       if s < g1 and e > g0), reverse=True)  # fmt: skip
        for overlap, length, name in over[:6]:
            print(f"    {overlap / 1e3:8.2f} ms of {length / 1e3:8.2f} ms  {name[:90]}")


def _profile_host(engine, steps: int) -> None:
    engine.step()  # capture any graph this batch shape still lacks
    graphs = engine.decode_graphs
    replays: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    run = graphs.run

    def timed_run(*args, **kwargs):  # GPU time of the graph replay alone
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = run(*args, **kwargs)
        end.record()
        replays.append((start, end))
        return logits

    graphs.run = timed_run
    plan = engine.backend.plan
    plan_s: list[float] = []

    def timed_plan(*args, **kwargs):  # host time of the backend's step layout
        start = time.perf_counter()
        plan(*args, **kwargs)
        plan_s.append(time.perf_counter() - start)

    engine.backend.plan = timed_plan
    before = engine.kv_stats()
    times = []
    for _ in range(steps):  # no profiler: the wall time is the TPOT at this batch size
        start = time.perf_counter()
        engine.step()  # returns once the sampled tokens are on the host
        times.append(time.perf_counter() - start)
    after = engine.kv_stats()
    torch.cuda.synchronize()  # async scheduling: the last replay may still be running
    gpu = [s.elapsed_time(e) for s, e in replays]
    times_ms = sorted(t * 1e3 for t in times)
    print(f"graph decode step: p50 {statistics.median(times_ms):.2f} ms, "
          f"min {times_ms[0]:.2f} ms, max {times_ms[-1]:.2f} ms over {steps} steps (wall); "
          f"graph replay p50 {statistics.median(gpu):.2f} ms GPU, "
          f"backend plan p50 {statistics.median(plan_s) * 1e3:.2f} ms host")  # fmt: skip
    _print_cache(before, after, steps)
    graphs.run, engine.backend.plan = run, plan
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(min(steps, 8)):
        engine.step()
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    _print_syncs(engine, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):  # the kernels the replays run (the padded batch, fixed widths)
            engine.step()
        torch.cuda.synchronize()
    _print_kernels(prof, steps, "graph replays", "decode step")


def _print_syncs(engine, steps: int) -> None:
    """The lines that make the host wait for the GPU over `steps` graph steps (with async
    scheduling only the read of the previous step's tokens should, and it is an event wait,
    which the sync debug mode does not report)."""
    with _sync_lines() as lines:
        for _ in range(steps):
            engine.step()
    print(f"synchronisations per graph step, by line ({steps} steps): {len(lines) or 'none'}")
    _print_lines(lines, steps)


@contextlib.contextmanager
def _sync_lines():
    """Yields a Counter that, once the block ends, holds each source line that made the host
    wait for the GPU inside it (torch's sync debug mode) and how often."""
    lines: collections.Counter[str] = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            yield lines
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lines.update(f"{w.filename}:{w.lineno}" for w in syncs)


def _print_lines(lines: collections.Counter, steps: int) -> None:
    for line, count in lines.most_common():
        print(f"  {count / steps:6.1f}  {line}")


def _print_cache(before, after, steps: int) -> None:
    """HBM hit rate and host -> GPU bytes of the measured steps (sparse modes)."""
    lookups = after.lookups - before.lookups
    if lookups:
        hits = after.hits - before.hits
        fetched = (after.h2d_bytes - before.h2d_bytes) / steps
        print(f"HBM hit rate {hits / lookups:.1%} over those steps, "
              f"{fetched / 1e9:.3f} GB host -> GPU per step")  # fmt: skip


if __name__ == "__main__":
    main()
