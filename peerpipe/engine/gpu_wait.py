"""Waiting for a GPU stream by polling an event instead of sleeping in the driver.

A stage's step ends with a wait for the GPU (its output goes on over the network). Asleep in
the driver, the thread's core may idle for the milliseconds of the step and wake slow; polling
keeps it busy, as the local engine's steps launched ahead keep its core busy. One run on an H200
(bench/stage_launch.py, docs/bench/stage-launch-gpu-h200.txt): polling was 2-90 µs a step faster
on the Llama-3-8B shape's stages and within the noise on the 1B shape's. GPU nodes busy-poll
their sockets as well (transport/loop.py). ``PEERPIPE_GPU_WAIT=block`` waits in the driver.
"""

from __future__ import annotations

import os

import torch

from peerpipe.compute import computing

SPIN = os.environ.get("PEERPIPE_GPU_WAIT", "spin") != "block"


def wait(device: torch.device) -> None:
    """Return once the work queued so far on ``device``'s current stream has run. While the
    compute thread has work (a prompt's forward, a draft model), the wait sleeps: a spinning
    thread would keep taking the GIL that thread needs between its kernels."""
    stream = torch.cuda.current_stream(device)
    if not SPIN or computing():
        stream.synchronize()
        return
    done = torch.cuda.Event()
    done.record(stream)
    while not done.query():
        pass
