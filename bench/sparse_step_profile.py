"""Decode-step bookkeeping of the sparse KV cache on the CPU: step time, operations per offloaded
layer, and host synchronisations per layer, for a decode-heavy workload.

    python bench/sparse_step_profile.py [--mode spin] [--sparse quest] [--requests 4] \
        [--context 4096]

spin-tiny (random weights, fp32) with 1 dense layer, so 3 of its 4 layers are offloaded;
`--sparse` (Quest by default) with its default settings, a 256-token budget, buffer_ratio 5,
page 16. After the prefills and a few warm-up steps it times `--steps` decode steps (median
wall clock per `engine.step()`) and counts, under a `TorchDispatchMode`, every aten operation
of each offloaded layer's decode attention
(`SpinAttentionBackend._decode`: select, retrieve/fetch, attention) and of the per-step plan
of the decode batch (`SpinAttentionBackend._plan_decode`).

Counting rules. A call into a kernel's torch reference (`KERNEL_STAND_INS`: a `*_ref` the CPU
runs in place of a Triton kernel) counts as ONE launch, the fused retrieval (`--fused`) as its
two; the operations inside them are not counted (the torch retrieval's are: a GPU runs them as
they are when it does not fuse). An op
"syncs" if on a CUDA tensor it would make the host wait for the GPU: `nonzero`, `item` /
`int()` / `bool()` (`_local_scalar_dense`), `unique`, `masked_select`, boolean-mask indexing,
`repeat_interleave` by a tensor, and `Tensor.tolist`. On the CPU nothing really waits: these
counts say what the GPU path would do. CPU step times are not GPU step times; the op counts
are the proxy for launches.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spin_ray.device.host_syncs import waits_for_device

VIEW_OPS = {  # metadata only: no kernel launch on a GPU
    "aten." + name
    for name in [
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "expand",
        "expand_as",
        "view",
        "view_as",
        "_unsafe_view",
        "permute",
        "flatten",
        "unflatten",
        "unbind",
        "split",
        "t",
        "transpose",
        "as_strided",
        "alias",
        "detach",
        "lift_fresh",
        "_reshape_alias",
        "reshape",
    ]
}
KERNEL_STAND_INS = {  # (kernels module, function) -> kernel launches it stands for on a GPU
    ("lru_victims", "lru_victims_ref"): 1,
    ("paged_attention_ref", "prefill_attention_ref"): 1,
    ("sparse_decode_attention", "sparse_decode_attention_ref"): 1,
    ("slot_token_store", "store_decode_tokens_ref"): 1,
    ("sparse_kv_store", "store_kv_head_major_ref"): 1,
    ("uva_gather", "gather_pages_ref"): 1,
    ("quest_append", "quest_append_ref"): 1,
    ("quest_page_scores", "quest_page_scores_ref"): 1,
    ("spin_retrieve", "spin_retrieve"): 2,  # the fused retrieval (`--fused`)
}


class _Calls:
    """The ops and syncs of each call of one backend method."""

    def __init__(self):
        self.ops: list[Counter] = []
        self.syncs: list[Counter] = []


class _Counting(TorchDispatchMode):
    """Counts, per call of the backend's decode layer (`_decode`) and decode plan
    (`_plan_decode`), every aten op and every host sync; a kernel stand-in counts as its
    launches, the ops inside it not at all. Where the engine is, a profile function
    (`sys.setprofile`: calls, returns and C calls such as `Tensor.tolist`) tells; nothing in
    the engine is replaced."""

    def __init__(self):
        super().__init__()
        from spin_ray.sparse.backend import SpinAttentionBackend

        self.scopes = {
            SpinAttentionBackend._decode.__code__: _Calls(),
            SpinAttentionBackend._plan_decode.__code__: _Calls(),
        }
        self.layer, self.plan = self.scopes.values()
        self.kernels = {
            getattr(importlib.import_module(f"spin_ray.kernels.{module}"), name).__code__: n
            for (module, name), n in KERNEL_STAND_INS.items()
        }
        self._scope = None  # the frame of the method call being counted
        self._kernel = None  # the frame of the kernel stand-in running inside it
        self._ops: Counter | None = None
        self._syncs: Counter | None = None

    def _counting(self) -> bool:
        return self._scope is not None and self._kernel is None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._counting():
            name = str(func.overloadpacket)
            name = "aten." + name.split(".")[-1] if not name.startswith("aten.") else name
            self._ops[name] += 1
            if waits_for_device(name, args):
                self._syncs[name] += 1
        return func(*args, **kwargs)

    def profile(self, frame, event, arg) -> None:
        if event == "call":
            code = frame.f_code
            if self._scope is None and code in self.scopes:
                self._scope, calls = frame, self.scopes[code]
                self._ops, self._syncs = Counter(), Counter()
                calls.ops.append(self._ops)
                calls.syncs.append(self._syncs)
            elif self._counting() and code in self.kernels:
                self._kernel = frame
                self._ops[f"kernel:{code.co_name}"] += self.kernels[code]
        elif event == "return":
            if frame is self._kernel:
                self._kernel = None
            elif frame is self._scope:
                self._scope = None
        elif event == "c_call" and self._counting() and _is_tolist(arg):
            self._syncs["Tensor.tolist"] += 1


def _is_tolist(fn) -> bool:
    return getattr(fn, "__name__", None) == "tolist" and isinstance(
        getattr(fn, "__self__", None), torch.Tensor
    )


@contextlib.contextmanager
def _counting(mode: _Counting):
    sys.setprofile(mode.profile)
    try:
        with mode:
            yield mode
    finally:
        sys.setprofile(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="spin", choices=["spin", "sparse-naive"])
    parser.add_argument("--sparse", default="quest", help="the algorithm (quest, shadowkv, ...)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--buffer-ratio", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--fused",
        action="store_true",
        help="retrieve with the fused Triton kernels (under the interpreter on the CPU: the "
        "op counts mean something, the step time does not)",
    )
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.fused:
        os.environ["TRITON_INTERPRET"] = "1"

    from spin_ray import LLM, SamplingParams

    torch.manual_seed(0)
    llm = LLM(
        model="spin-tiny",
        device="cpu",
        page_size=16,
        progress=False,
        sparse=args.sparse,
        tiers=args.mode,
        token_budget=args.token_budget,
        dense_layers=1,
        cpu_cache_tokens=args.requests * (args.context + 256),
        buffer_ratio=args.buffer_ratio,
        fused_retrieve=args.fused,
    )
    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=args.warmup + args.steps + 4, temperature=0.0, ignore_eos=True
    )
    for r in range(args.requests):
        ids = [(r * 131 + j * 17) % 250 + 3 for j in range(args.context)]
        engine.add_request(f"r{r}", {"prompt_token_ids": ids}, params)
    while any(len(req.output_token_ids) == 0 for req in engine.scheduler.running) or (
        engine.num_waiting
    ):
        engine.step()
    for _ in range(args.warmup):
        engine.step()

    mode = _Counting()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with _counting(mode):
            engine.step()
        times.append(time.perf_counter() - t0)
    # a clean timing without the counting overhead
    clean = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.step()
        clean.append(time.perf_counter() - t0)

    def per_call(counters: list[Counter]) -> float:
        return sum(sum(c.values()) for c in counters) / max(1, len(counters))

    def launches(calls: _Calls) -> float:
        total = sum(n for c in calls.ops for op, n in c.items() if op not in VIEW_OPS)
        return total / max(1, len(calls.ops))

    merged_ops, merged_syncs = Counter(), Counter()
    for ops, syncs in zip(mode.layer.ops, mode.layer.syncs, strict=True):
        merged_ops.update(ops)
        merged_syncs.update(syncs)
    n_layers = max(1, len(mode.layer.ops))
    stats = llm.kv_stats()
    result = dict(
        mode=args.mode,
        fused_retrieve=args.fused,
        requests=args.requests,
        context=args.context,
        token_budget=args.token_budget,
        buffer_ratio=args.buffer_ratio,
        step_ms_median=1e3 * statistics.median(clean),
        step_ms_median_while_counting=1e3 * statistics.median(times),
        ops_per_layer=per_call(mode.layer.ops),
        launches_per_layer=launches(mode.layer),
        syncs_per_layer=per_call(mode.layer.syncs),
        ops_per_plan=per_call(mode.plan.ops),
        launches_per_plan=launches(mode.plan),
        syncs_per_plan=per_call(mode.plan.syncs),
        hit_rate=stats.hit_rate,
        top_ops_per_layer={
            k: v / n_layers for k, v in merged_ops.most_common() if k not in VIEW_OPS
        },
        syncs_by_op_per_layer={k: v / n_layers for k, v in merged_syncs.most_common()},
    )
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
