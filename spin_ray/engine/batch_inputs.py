"""Turn a scheduled step into the packed tensors the model and attention backend read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spin_ray.attention.metadata import AttentionMetadata
from spin_ray.device.step_buffers import StepBuffers, bucket, to_device_async, to_step
from spin_ray.engine.host_page_tables import HostPageTables
from spin_ray.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class BatchInputs:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    attention: AttentionMetadata
    sample_rows: torch.Tensor  # [M] int64: rows of the packed batch whose logits are sampled
    sample_request_ids: tuple[str, ...]  # [M] the request each sampled row belongs to


@dataclass(frozen=True)
class DeviceTokens:
    """The tokens sampled by the step in flight (async scheduling), still on the device: a
    decode row whose input is one of them reads it from here."""

    token_ids: torch.Tensor
    """[M] int64, on the device."""
    rows: dict[str, int]
    """Request id -> its row of `token_ids`."""


def build_batch_inputs(
    step: SchedulerOutput,
    page_tables: HostPageTables,
    page_size: int,
    device: torch.device | str,
    graph: GraphBatch | None = None,
    pending: DeviceTokens | None = None,
) -> BatchInputs:
    """Pack the step's chunks in order, with each request's page ids from `page_tables`; a
    chunk ending in a pending token (`Request.num_pending_tokens`) takes its id from `pending`,
    on the device.

    With `graph` (a decode-only step run as a CUDA graph), the batch is padded to
    `graph.batch_size` sequences (see `AttentionMetadata.num_padded`), the page table to a
    power-of-two width of at least `graph.page_width`, and every tensor lands in
    `graph.buffers`."""
    input_ids: list[int] = []
    from_device: list[tuple[int, int]] = []  # (packed row, row of pending.token_ids)
    positions: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    query_start = [0]
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[np.ndarray] = []
    sample_rows: list[int] = []
    sample_ids: list[str] = []
    for chunk in step.chunks:
        request, n = chunk.request, chunk.num_new_tokens
        start = request.num_computed_tokens
        table = page_tables.row(request.request_id)  # [pages]
        known = min(start + n, request.num_known_tokens)
        input_ids.extend(request.token_ids(start, known))
        if known < start + n:  # the last token is still on the device
            assert start + n - known == 1 and pending is not None, "one pending token at most"
            from_device.append((len(input_ids), pending.rows[request.request_id]))
            input_ids.append(0)
        position = np.arange(start, start + n)  # [n]
        positions.append(position)
        slots.append(table[position // page_size] * page_size + position % page_size)
        query_start.append(query_start[-1] + n)
        query_lens.append(n)
        context_lens.append(start + n)
        tables.append(table)
        if chunk.samples:
            sample_rows.append(query_start[-1] - 1)
            sample_ids.append(request.request_id)

    num_padded = 0
    max_pages = max(len(t) for t in tables)
    if graph is not None:
        num_padded = graph.batch_size - len(tables)
        assert num_padded >= 0 and len(input_ids) == len(tables), "a graph batch is decode-only"
        input_ids.extend([0] * num_padded)
        positions.append(np.zeros(num_padded, dtype=np.int64))
        slots.append(np.full(num_padded, -1, dtype=np.int64))
        query_start.extend(range(query_start[-1] + 1, query_start[-1] + 1 + num_padded))
        query_lens.extend([1] * num_padded)
        context_lens.extend([1] * num_padded)
        max_pages = max(graph.page_width, bucket(max_pages))
    padded = np.zeros((len(tables) + num_padded, max_pages), dtype=np.int32)  # padding: page 0
    for row, table in zip(padded, tables):
        row[: len(table)] = table

    def tensor(values, dtype, name):
        host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values)
        return to_step(name, host.to(dtype), device, graph.buffers if graph else None)

    positions_t = tensor(np.concatenate(positions), torch.int64, "positions")  # [N]
    meta = AttentionMetadata(
        query_start_loc=tensor(query_start, torch.int32, "query_start_loc"),
        context_lens=tensor(context_lens, torch.int32, "context_lens"),
        page_table=tensor(padded, torch.int32, "page_table"),
        slot_mapping=tensor(np.concatenate(slots), torch.int64, "slot_mapping"),
        query_lens_cpu=tuple(query_lens),
        context_lens_cpu=tuple(context_lens),
        page_size=page_size,
        request_ids=tuple(c.request.request_id for c in step.chunks),
        graph_batch=graph is not None,
        num_padded=num_padded,
        positions=positions_t,
    )
    input_ids_t = tensor(input_ids, torch.int64, "input_ids")  # [N]
    if from_device:
        dst, src = to_device_async(torch.tensor(list(zip(*from_device))), device)  # 2 x [k]
        input_ids_t.index_copy_(0, dst, pending.token_ids.index_select(0, src))
    return BatchInputs(
        input_ids=input_ids_t,
        positions=positions_t,
        attention=meta,
        sample_rows=to_device_async(torch.tensor(sample_rows, dtype=torch.int64), device),
        sample_request_ids=tuple(sample_ids),
    )


@dataclass(frozen=True)
class GraphBatch:
    """How to lay out a decode-only step for a CUDA graph."""

    batch_size: int
    """Sequences of the graph (>= the step's; the rest are padding)."""
    buffers: StepBuffers
    """Where the step's tensors go (the addresses the graph reads)."""
    page_width: int = 0
    """The least width of the page table (`AttentionBackend.graph_page_width`)."""
