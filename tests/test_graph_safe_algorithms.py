"""An algorithm marked `graph_safe` runs its decode-time work — `append` of a step's decode
tokens (padding rows included), `page_scores`, `estimate` — without one operation that makes
the host wait for a GPU (spin_ray/device/host_syncs.py), so decode steps can be CUDA graphs:
checked on the CPU by recording every aten operation they dispatch."""

from __future__ import annotations

import pytest
import torch
from small_algorithms import small_algorithm
from torch.utils._python_dispatch import TorchDispatchMode

from spin_ray.device.host_syncs import waits_for_device
from spin_ray.sparse.algorithms import (
    ALGORITHM_CLASSES,
    SelectBatch,
    SparseGeometry,
    build_algorithm,
)
from spin_ray.sparse.config import SparseConfig

PAGE, HKV, HQ, D, CPU_PAGES, LAYERS = 8, 2, 4, 16, 64, 2


class _Waits(TorchDispatchMode):
    """Records every dispatched aten operation that would make the host wait."""

    def __init__(self):
        super().__init__()
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = "aten." + str(func.overloadpacket).split(".")[-1]
        if waits_for_device(name, args):
            self.waits.append(name)
        return func(*args, **(kwargs or {}))


def test_the_recorder_sees_a_wait():
    """The check can fail: an operation the GPU path must avoid is recorded."""
    x = torch.tensor([0.0, 1.0, 2.0])
    with _Waits() as mode:
        x[x > 0].sum()
        x.nonzero()
    assert mode.waits == ["aten.index", "aten.nonzero"]


GRAPH_SAFE = [name for name, cls in ALGORITHM_CLASSES.items() if cls.graph_safe]


def test_every_algorithm_is_graph_safe():
    """Issue 27: no algorithm keeps decode steps out of CUDA graphs any more."""
    assert set(ALGORITHM_CLASSES) - set(GRAPH_SAFE) == set()


@pytest.mark.parametrize("name", GRAPH_SAFE)
def test_graph_safe_decode_work_never_waits(name):
    geometry = SparseGeometry(
        num_layers=LAYERS, first_layer=0, num_cpu_pages=CPU_PAGES, page_size=PAGE,
        num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, dtype=torch.float32,
        device=torch.device("cpu"), sink_tokens=PAGE,
        rope_inv_freq=1.0 / 10000 ** (torch.arange(0, D, 2).float() / D),
    )  # fmt: skip
    config = SparseConfig(algorithm=small_algorithm(name, PAGE), sink_tokens=PAGE)
    algorithm = build_algorithm(geometry, config)
    gen = torch.Generator().manual_seed(0)
    lengths = (13 * PAGE + 3, 9 * PAGE)  # two requests, stored as prefill chunks
    tables, start = [], 0
    for n in lengths:
        pages = -(-(n + 1) // PAGE)
        table = torch.arange(start, start + pages)
        start += pages
        positions = torch.arange(n)
        slots = table[positions // PAGE] * PAGE + positions % PAGE
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        for layer in range(LAYERS):
            algorithm.append_chunk(layer, slots, k, v, 0, positions)
            if algorithm.layout_tokens:  # what the runtime does once a span is stored
                span = slice(PAGE, n // PAGE * PAGE)
                algorithm.lay_out(layer, table[1 : n // PAGE], 1, k[span], v[span])
        tables.append(table)
    width = max(len(t) for t in tables)
    page_table = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables])
    positions = torch.tensor([*lengths, 0])  # each request's next token, then a padding row
    slots = torch.tensor([int(t[n // PAGE]) * PAGE + n % PAGE for t, n in zip(tables, lengths)]
                         + [-1])  # fmt: skip
    context = torch.tensor(lengths) + 1
    batch = SelectBatch(
        request_ids=("a", "b"),
        page_table=page_table.int(),
        num_pages=(context + PAGE - 1) // PAGE,
        indexed_pages=(context - 1)
        // PAGE
        // algorithm.index_unit_pages
        * algorithm.index_unit_pages,
        context_lens=context,
    )
    q = torch.randn(2, HQ, D, generator=gen)
    k, v = torch.randn(3, HKV, D, generator=gen), torch.randn(3, HKV, D, generator=gen)
    chosen = torch.tensor([[[0, 2, 5, -1]] * HKV, [[1, 3, -1, -1]] * HKV])  # [B, Hkv, K]
    with _Waits() as mode:
        for layer in range(LAYERS):
            algorithm.append(layer, slots, k, v, positions)
            scores = algorithm.page_scores(layer, q, batch)
            algorithm.estimate(layer, q, batch, chosen, 0.25)
    assert scores.shape == (2, HKV, width)
    assert mode.waits == [], f"{name} would make the host wait: {sorted(set(mode.waits))}"
