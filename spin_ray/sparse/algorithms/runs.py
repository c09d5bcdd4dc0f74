"""A prefill chunk's tokens summed per run of `unit` consecutive positions (a page, a chunk of
a page), for summaries kept as running means (ShadowKV's landmarks, RetroInfer's page
clusters), without host synchronisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runs:
    sums: torch.Tensor
    """[G, ...] fp32: Σ of the chunk's rows in each run it touches."""
    counts: torch.Tensor
    """[G, 1, ...] fp32: the chunk's tokens in each run (broadcasts against `sums`)."""
    before: torch.Tensor
    """[G, 1, ...] fp32: tokens of each run stored before the chunk (only the first run's)."""
    firsts: torch.Tensor
    """[G] int64: each run's first row in the chunk."""

    def means(self, old: torch.Tensor) -> torch.Tensor:  # [G, ...] -> [G, ...] fp32
        """Each run's mean after the chunk, from `old` (its mean before, ignored if none)."""
        return (old.float() * self.before + self.sums) / (self.before + self.counts)


def runs_of(
    x: torch.Tensor,  # [n, ...] one chunk's rows, consecutive positions
    first_offset: int,  # the chunk's first position modulo `unit`
    unit: int,
) -> Runs:
    n, rest = x.shape[0], x.shape[1:]
    num = (first_offset + n + unit - 1) // unit
    padded = x.new_zeros((num * unit, *rest), dtype=torch.float32)  # [G * unit, ...]
    padded[first_offset : first_offset + n] = x
    run = torch.arange(num, device=x.device)  # [G]
    firsts = (run * unit - first_offset).clamp(min=0)
    ends = ((run + 1) * unit - first_offset).clamp(max=n)
    shape = (num,) + (1,) * len(rest)
    return Runs(
        sums=padded.view(num, unit, *rest).sum(1),
        counts=(ends - firsts).float().view(shape),
        before=torch.where(run == 0, float(first_offset), 0.0).view(shape),
        firsts=firsts,
    )
