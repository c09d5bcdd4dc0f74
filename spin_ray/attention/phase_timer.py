"""Seconds spent in named phases of the forward (select, fetch, attention, …), for the time
shares `spin-ray bench` reports. On the GPU each phase is bracketed by CUDA events that are
read only when the totals are asked for, so timing adds no synchronisation."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device: torch.device, names: tuple[str, ...]):
        self.device = device
        self._seconds = dict.fromkeys(names, 0.0)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.timed = True
        """Time the phases. Off when decode steps replay CUDA graphs (a replay cannot be timed
        per phase, nor a capture record timing events); `seconds` then reports None."""

    @contextmanager
    def phase(self, name: str):
        if not self.timed:
            yield
        elif self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float | None]:
        """Total seconds per phase since the start (None for all once untimed)."""
        for name, start, end in self._pending:
            end.synchronize()
            self._seconds[name] += start.elapsed_time(end) / 1e3
        self._pending.clear()
        return dict(self._seconds) if self.timed else dict.fromkeys(self._seconds)
