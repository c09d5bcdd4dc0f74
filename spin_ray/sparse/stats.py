"""The tiered cache's running counters behind its `KVStats` snapshots."""

from __future__ import annotations

import torch

from spin_ray.cache.stats import KVStats
from spin_ray.device.phase_timer import PhaseTimer


class KVCounters:
    """Running totals. Counts computed on the device stay there until `snapshot` reads them,
    and phases are timed with CUDA events on the GPU, so counting adds no synchronisation."""

    def __init__(self, device: torch.device):
        self.device = device
        # lookups, hits, evictions, h2d bytes of page fetches
        self._counts = torch.zeros(4, dtype=torch.int64, device=device)
        self._prefetch_counts = torch.zeros(4, dtype=torch.int64, device=device)
        self.h2d_bytes = 0  # host-counted transfers (prefix reads, indexing)
        self.d2h_bytes = 0
        self.timer = PhaseTimer(device, ("select", "fetch", "index", "attention"))
        """Phase times; the backend's dense layers share it (their decode attention counts)."""

    def add_lookups(self, lookups: torch.Tensor | int, hits: torch.Tensor | int) -> None:
        self._counts[0] += lookups
        self._counts[1] += hits

    def add_evictions(self, evictions: torch.Tensor | int) -> None:
        self._counts[2] += evictions

    @property
    def device_counts(self) -> torch.Tensor:  # [4] int64
        """The device-side totals (lookups, hits, evictions, fetched bytes), for kernels that
        add to them in place."""
        return self._counts

    @property
    def prefetch_counts(self) -> torch.Tensor:  # [4] int64
        """`device_counts` of lookahead retrievals: their evictions and bytes count in the
        totals, their lookups and hits do not (the hit rate is the real selections')."""
        return self._prefetch_counts

    def add_fetched_bytes(self, num_bytes: torch.Tensor) -> None:
        """Bytes of page fetches counted on the device (`h2d_bytes` adds them up)."""
        self._counts[3] += num_bytes

    def snapshot(self, **gauges: int) -> KVStats:
        lookups, hits, evictions, fetched = self._counts.tolist()
        _, _, prefetch_evictions, prefetched = self._prefetch_counts.tolist()
        seconds = self.timer.seconds()
        return KVStats(
            lookups=lookups,
            hits=hits,
            h2d_bytes=self.h2d_bytes + fetched + prefetched,
            prefetched_bytes=prefetched,
            d2h_bytes=self.d2h_bytes,
            evictions=evictions + prefetch_evictions,
            select_time_s=seconds["select"],
            fetch_time_s=seconds["fetch"],
            index_time_s=seconds["index"],
            attention_time_s=seconds["attention"],
            **gauges,
        )
