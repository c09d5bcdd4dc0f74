"""PhaseTimer: per-phase totals on the CPU clock, and None once decode steps replay graphs."""

import time

import torch

from spin_ray.device.phase_timer import PhaseTimer


def test_phases_add_up_and_untimed_reports_none():
    timer = PhaseTimer(torch.device("cpu"), ("select", "attention"))
    for _ in range(2):
        with timer.phase("attention"):
            time.sleep(0.01)
    seconds = timer.seconds()
    assert seconds["select"] == 0.0 and seconds["attention"] >= 0.02
    timer.timed = False
    with timer.phase("select"):
        pass
    assert timer.seconds() == {"select": None, "attention": None}
