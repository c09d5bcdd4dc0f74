"""Seconds spent in named phases of the forward (select, fetch, attention, …), for the time
shares `spin-ray bench` reports. On the GPU each phase is bracketed by CUDA events that are
read only when the totals are asked for, so timing adds no synchronisation."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

_FOLD_AFTER = 4096
"""Pending event pairs past which `phase` folds the finished ones into the totals."""


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
            if len(self._pending) > _FOLD_AFTER:  # a long run nobody asks: fold what finished
                self._fold(wait=False)
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float | None]:
        """Total seconds per phase since the start (None for all once untimed)."""
        self._fold(wait=True)
        return dict(self._seconds) if self.timed else dict.fromkeys(self._seconds)

    def _fold(self, wait: bool) -> None:
        """Add the pending phases to the totals, oldest first; without `wait`, only those whose
        end event has completed (no synchronisation)."""
        done = 0
        for name, start, end in self._pending:
            if not wait and not end.query():
                break
            end.synchronize()
            self._seconds[name] += start.elapsed_time(end) / 1e3
            done += 1
        del self._pending[:done]
