"""The marks a traced stage step leaves inside its forward (inference/trace.py): when its work
reached the device, how long the GPU ran it, when its output was back on the host.

Made only while tracing: the CUDA events it records cost a little on every step."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from peerpipe.inference import trace
from peerpipe.protocol import ComputeRequest


class StepClock:
    def __init__(self, requests: Sequence[ComputeRequest], node: str, device: torch.device) -> None:
        self._steps = [(r.task_id, r.start_pos) for r in requests]
        self._node = node
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()

    def launched(self) -> None:
        """The step's work is on the device (a CPU stage's forward has no launch to mark)."""
        if self._events is not None:
            self._events[1].record()
            self._mark("launched")

    def ready(self) -> None:
        """The output is on the host (so the events have completed)."""
        now = time.monotonic_ns()
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            ran_ns = int(start.elapsed_time(end) * 1e6)
            self._mark("run", now - ran_ns)
        self._mark("ready", now)

    def _mark(self, event: str, at_ns: int | None = None) -> None:
        for task_id, position in self._steps:
            trace.mark(event, task_id, position, self._node, at_ns)
