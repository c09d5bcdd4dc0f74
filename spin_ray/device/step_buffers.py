"""Device buffers that keep their addresses from step to step, for CUDA graphs.

A CUDA graph replays kernels on the addresses it captured, so whatever a captured step reads
must sit in the same tensor at every replay. `StepBuffers.put` copies a step's values into the
buffer named for them and returns it; each (name, shape, dtype) gets one buffer for good, so
two steps with the same shapes read the same memory. `to_step` is how a step's tensors reach
the device either way.

Host values go over from pinned memory without waiting (`to_device_async`): a copy from
pageable memory may wait for the GPU to finish its queue, which would stall the host while
it prepares the next step as the current one runs (async scheduling). Results come back the
same way (`to_host_async`), read once a `stream_mark` recorded after their copies has passed.
"""

from __future__ import annotations

import torch


def bucket(n: int) -> int:
    """`n` rounded up to a power of two (0 stays 0): the widths that vary from step to step
    are bucketed so that similar steps share one CUDA graph."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _staged(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor bound for CUDA, in pinned memory (torch's pinned-memory cache keeps the
    block until the copy has run, so it is never overwritten early); else `values`."""
    if device.type == "cuda" and values.device.type == "cpu":
        return values.pin_memory()
    return values


def to_device_async(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`values` on `device`, copied from pinned memory without the host waiting."""
    device = torch.device(device)
    return _staged(values, device).to(device, non_blocking=True)


def to_host_async(values: torch.Tensor) -> torch.Tensor:
    """A host copy of `values`, started without waiting (into pinned memory from CUDA): read
    it only once a `stream_mark` recorded after it has passed (on the CPU it is done)."""
    if not values.is_cuda:
        return values.clone()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def stream_mark(like: torch.Tensor) -> torch.cuda.Event | None:
    """An event after the work queued so far on the current stream, for a CUDA tensor `like`;
    None on the CPU, where that work is done already."""
    if not like.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def to_step(
    name: str, values: torch.Tensor, device: torch.device | str, buffers: StepBuffers | None
) -> torch.Tensor:
    """`values` (host or device) as a tensor of the step: in the persistent buffer `name` for
    a CUDA-graph step (`buffers`), else on `device` (a copy only if it is elsewhere)."""
    if buffers is None:
        return to_device_async(values, device)
    return buffers.put(name, values)


class StepBuffers:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def put(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """`values` (host or device) copied into the buffer for (name, shape, dtype)."""
        key = (name, tuple(values.shape), values.dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty(key[1], dtype=values.dtype, device=self.device)
            self._buffers[key] = buffer
        buffer.copy_(_staged(values, self.device), non_blocking=True)
        return buffer
