"""A GPU stage's count of decode steps sent early (inference/gpu_rows.py ``GpuSteps``): after the
first 8, one in 8 is timed by CUDA events, and the rest count at the timed ones' mean. The events
are stand-ins here (no GPU on this machine); the CUDA tests run the real ones."""

from __future__ import annotations

import pytest

from peerpipe.inference import gpu_rows


class Event:
    """A CUDA event whose step took 2 ms and has run."""

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: Event) -> float:
        return 2.0


def test_steps_not_timed_still_count_at_the_timed_ones_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_rows.torch.cuda, "Event", Event)
    steps = gpu_rows.GpuSteps()
    timed = 0
    for _ in range(40):
        pair = steps.begin()
        timed += pair is not None
        steps.end(pair)
    assert timed == gpu_rows.TIME_FIRST + (40 - gpu_rows.TIME_FIRST) // gpu_rows.TIME_EVERY < 40
    count, seconds = steps.collect()
    assert count == 40 and seconds == pytest.approx(40 * 0.002)
    assert steps.collect() == (0, 0.0)
