"""Waiting for a GPU stream by polling an event instead of sleeping in the driver.

A stage's step ends with a wait for the GPU (its output goes on over the network). Asleep in
the driver, the thread's core goes idle for the milliseconds of the step and wakes cold: on an
H200 host the CPU work just after (sending the output, taking the next step in, launching its
graph) then took about 200 µs more than on a core that stayed busy (bench/stage_launch.py).
Polling keeps it busy, as the local engine's steps launched ahead keep its core busy.
``PEERPIPE_GPU_WAIT=block`` waits in the driver instead.
"""

from __future__ import annotations

import os

import torch

SPIN = os.environ.get("PEERPIPE_GPU_WAIT", "spin") != "block"


def wait(device: torch.device, spin: bool | None = None) -> None:
    """Return once the work queued so far on ``device``'s current stream has run."""
    stream = torch.cuda.current_stream(device)
    if not (SPIN if spin is None else spin):
        stream.synchronize()
        return
    done = torch.cuda.Event()
    done.record(stream)
    while not done.query():
        pass
