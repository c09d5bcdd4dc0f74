"""Decode-step bookkeeping of the sparse KV cache on the CPU: step time, operations per offloaded
layer, and host synchronisations per layer, for a decode-heavy workload.

    python bench/sparse_step_profile.py [--mode spin] [--requests 4] [--context 4096]

spin-tiny (random weights, fp32) with 1 dense layer, so 3 of its 4 layers are offloaded; Quest,
a 256-token budget, buffer_ratio 5, page 16. After the prefills and a few warm-up steps it
times `--steps` decode steps (median wall clock per `engine.step()`) and counts, under a
`TorchDispatchMode`, every aten operation of each offloaded layer's decode attention
(`SpinAttentionBackend._decode`: select, retrieve/fetch, attention) and of the per-step plan.

Counting rules. A call into a kernel's torch reference (`*_ref`, which the CPU runs in place
of a Triton kernel) counts as ONE launch; the operations inside it are not counted. An op
"syncs" if on a CUDA tensor it would make the host wait for the GPU: `nonzero`, `item` /
`int()` / `bool()` (`_local_scalar_dense`), `unique`, `masked_select`, boolean-mask indexing,
`repeat_interleave` by a tensor, and `Tensor.tolist`. On the CPU nothing really waits: these
counts say what the GPU path would do. CPU step times are not GPU step times; the op counts
are the proxy for launches.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten.nonzero",
    "aten.nonzero_numpy",
    "aten.item",
    "aten._local_scalar_dense",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.masked_select",
    "aten.is_nonzero",
}
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
REF_MODULES = (
    "spin_ray.sparse.backend",
    "spin_ray.sparse.tiers",
    "spin_ray.sparse.residency",
    "spin_ray.sparse.algorithms.quest",
)


class _Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.syncs = Counter()
        self.in_ref = 0

    def count_ref(self, name: str) -> None:
        self.ops[f"kernel:{name}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.in_ref:
            name = str(func.overloadpacket)
            name = "aten." + name.split(".")[-1] if not name.startswith("aten.") else name
            self.ops[name] += 1
            if name in SYNC_OPS or _bool_index(name, args) or _repeat_by_tensor(name, args):
                self.syncs[name] += 1
        return func(*args, **kwargs)


def _bool_index(name, args) -> bool:
    if name not in ("aten.index", "aten.index_put", "aten.index_put_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype == torch.bool for t in indices)


def _repeat_by_tensor(name, args) -> bool:
    return (
        name == "aten.repeat_interleave"
        and isinstance(args[0], torch.Tensor)
        and (args[0].dtype in (torch.int64, torch.int32) and len(args) == 1)
    )


_ACTIVE: list[_Counting] = []


def _patch_refs() -> None:
    """Make each kernel reference, and the fused retrieval (two launches), count as launches
    while a counter is active."""
    backend = importlib.import_module("spin_ray.sparse.backend")
    backend.spin_retrieve = _as_kernel("spin_retrieve", backend.spin_retrieve, launches=2)
    for mod_name in REF_MODULES:
        mod = importlib.import_module(mod_name)
        for attr in dir(mod):
            fn = getattr(mod, attr)
            if attr.endswith("_ref") and callable(fn) and not hasattr(fn, "_counted"):
                setattr(mod, attr, _as_kernel(attr, fn))


def _as_kernel(name, fn, launches=1):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _ACTIVE:
            return fn(*args, **kwargs)
        mode = _ACTIVE[-1]
        for _ in range(launches):
            mode.count_ref(name)
        mode.in_ref += 1
        try:
            return fn(*args, **kwargs)
        finally:
            mode.in_ref -= 1

    wrapper._counted = True
    return wrapper


@contextlib.contextmanager
def _counting(into: list):
    mode = _Counting()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        if not mode.in_ref:
            mode.syncs["Tensor.tolist"] += 1
        return real_tolist(self)

    torch.Tensor.tolist = tolist
    _ACTIVE.append(mode)
    try:
        with mode:
            yield mode
    finally:
        _ACTIVE.pop()
        torch.Tensor.tolist = real_tolist
        into.append(mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="spin", choices=["spin", "sparse-naive"])
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
    from spin_ray.sparse import SparseConfig

    torch.manual_seed(0)
    llm = LLM(
        model="spin-tiny",
        device="cpu",
        page_size=16,
        progress=False,
        sparse="quest",
        mode=args.mode,
        token_budget=args.token_budget,
        dense_layers=1,
        cpu_cache_tokens=args.requests * (args.context + 256),
        sparse_config=SparseConfig(buffer_ratio=args.buffer_ratio, index_interval=8),
    )
    engine = llm.llm_engine
    backend = engine.backend
    backend.fused_retrieve = args.fused
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

    _patch_refs()
    layer_counts: list[_Counting] = []
    plan_counts: list[_Counting] = []
    real_decode, real_plan = backend._decode, backend._plan_decode

    def counted_decode(*a, **kw):
        with _counting(layer_counts):
            return real_decode(*a, **kw)

    def counted_plan(*a, **kw):
        with _counting(plan_counts):
            return real_plan(*a, **kw)

    times = []
    for _ in range(args.steps):
        backend._decode, backend._plan_decode = counted_decode, counted_plan
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        del backend._decode, backend._plan_decode
    # a clean timing without the counting overhead
    clean = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.step()
        clean.append(time.perf_counter() - t0)

    def per_call(modes: list[_Counting], what: str) -> float:
        return sum(sum(getattr(m, what).values()) for m in modes) / max(1, len(modes))

    def launches(modes: list[_Counting]) -> float:
        total = sum(n for m in modes for op, n in m.ops.items() if op not in VIEW_OPS)
        return total / max(1, len(modes))

    merged_ops, merged_syncs = Counter(), Counter()
    for m in layer_counts:
        merged_ops.update(m.ops)
        merged_syncs.update(m.syncs)
    n_layers = max(1, len(layer_counts))
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
        ops_per_layer=per_call(layer_counts, "ops"),
        launches_per_layer=launches(layer_counts),
        syncs_per_layer=per_call(layer_counts, "syncs"),
        ops_per_plan=per_call(plan_counts, "ops"),
        launches_per_plan=launches(plan_counts),
        syncs_per_plan=per_call(plan_counts, "syncs"),
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
