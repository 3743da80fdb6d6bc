"""A GPU stage's decode output into shared memory without waiting for the GPU.

Between stages on one machine (plan wire "local") a hidden-state row travels through a
shared-memory ring (transport/shared_memory.py). Waiting for the GPU before writing it there
puts the whole hand-off (the message, the socket, the next stage's wake-up and its preparation)
after this stage's GPU work. Instead the ring's pages are registered with CUDA, so the copy off
the device runs on the stream after the step, followed by a one-byte copy that marks the
allocation written; the reference is sent at once. The next stage receives it while this GPU
still computes and waits only for the mark (``shared_written``).

A step sent this way is timed by CUDA events, read once the GPU has run it (``GpuSteps``): the
stage's statistics (what the host compares with the plan) stay the GPU's time, not the launch's.
Past the first steps only one in ``TIME_EVERY`` is timed: recording an event is a driver call on
the path from the input to the launch (20-40 µs on the H200 machine's CPU). The others count at
the timed ones' mean, so the stage's count of steps (its heartbeat, ``/metrics``) stays whole.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import time
import weakref

import torch

from peerpipe.compute import computing, work_done
from peerpipe.inference.wire import WIRE_NAMES, shared_written
from peerpipe.protocol import TensorData
from peerpipe.transport.loop import PAUSED_S
from peerpipe.transport.shared_memory import HEADER, PENDING_S, STATE_AT, WRITTEN, Ring, SharedMemoryError

log = logging.getLogger(__name__)
SPIN_S = 0.002  # how long a reader spins for pending rows before it polls on the event loop's turns
TIME_FIRST = 8  # steps sent early that are all timed, before one in TIME_EVERY is
TIME_EVERY = 8


async def rows_written(rows: list[TensorData]) -> None:
    """Return once every row is there to read: at once unless a GPU stage sent it pending. The
    wait spins a moment (a GPU's copy lands within the step), then polls without holding the
    event loop; past PENDING_S its sender is gone or stuck: ``SharedMemoryError``."""
    pending = [data for data in rows if not shared_written(data)]
    spin_until = time.monotonic() + SPIN_S
    deadline = spin_until + PENDING_S
    while pending:
        now = time.monotonic()
        if now > deadline:
            raise SharedMemoryError(f"{len(pending)} row(s) in shared memory not written within {PENDING_S:.0f} s")
        await pause(now > spin_until)
        pending = [data for data in pending if not shared_written(data)]


async def pause(turn: bool) -> None:
    """Between two looks at shared memory: none (spinning), or the loop's turn. While another
    thread of this process computes (it may be the writer, and a spinning thread would keep
    taking the GIL from it at every operation): on a CPU, until that work is done, since every
    look wakes a thread that takes a core from its team (a tiny model's room of one went from 2
    to 290 ms a token); on a GPU, whose compute thread may run a long prompt meanwhile, a short sleep."""
    if computing():
        await (asyncio.sleep(PAUSED_S) if torch.cuda.is_initialized() else work_done())
    elif turn:
        await asyncio.sleep(0)


class RingWriter:
    """Rows from the device into ``ring``, pending until the GPU's copy has run."""

    def __init__(self, ring: Ring, device: torch.device) -> None:
        self.ring = ring
        self._host = torch.frombuffer(ring.mm, dtype=torch.uint8)
        address = self._host.data_ptr()
        result = int(torch.cuda.cudart().cudaHostRegister(address, ring.capacity, 1))  # 1: portable
        if result != 0:
            _clear_last_error()  # or torch's next launch would raise it
            del self._host
            raise OSError(f"cudaHostRegister of {ring.capacity} bytes of shared memory failed: error {result}")
        # Unregistered before the pages can be unmapped: a later mapping at the same address
        # would fail to register, "already mapped".
        self._unregister = weakref.finalize(self, _unregister, address)
        self._written = torch.full((1,), WRITTEN, dtype=torch.uint8, device=device)

    @classmethod
    def try_open(cls, ring: Ring, device: torch.device, label: str) -> RingWriter | None:
        """A writer, or None where the ring cannot be registered (rows then wait for the GPU, as
        before). Not tried on ROCm, where a failed registration's error is not cleared here."""
        if torch.version.hip:
            return None
        try:
            return cls(ring, device)
        except Exception as exc:  # an optimisation: any failure only turns it off
            log.warning("%s: cannot register shared memory with CUDA (%s); rows wait for the GPU", label, exc)
            return None

    def send(self, row: torch.Tensor) -> TensorData | None:
        """``row`` (``[1, ...]`` on the device) as a pending shared-memory tensor; None when the
        ring is full (the caller then waits for the GPU and sends it as before)."""
        nbytes = row.numel() * row.element_size()
        got = self.ring.alloc(nbytes, pending=True)
        if got is None:
            return None
        ref, _ = got
        start = ref.offset + HEADER  # 64-byte aligned: any dtype may view it
        self._host[start : start + nbytes].view(row.dtype).view(row.shape).copy_(row, non_blocking=True)
        self._host[ref.offset + STATE_AT : ref.offset + STATE_AT + 1].copy_(self._written, non_blocking=True)
        return TensorData(WIRE_NAMES[row.dtype], tuple(row.shape), ref.pack(), "shm")

    def close(self) -> None:
        """Unregister the pages (before the ring unmaps them), once the copies in flight are done."""
        if self._unregister.alive:
            torch.cuda.synchronize(self._written.device)
            self._unregister()


def _unregister(address: int) -> None:
    if int(torch.cuda.cudart().cudaHostUnregister(address)) != 0:
        _clear_last_error()


def _clear_last_error() -> None:
    """Reset CUDA's last error, through the runtime library torch loaded (best effort)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError, IndexError) as exc:
        log.debug("could not reset CUDA's last error: %s", exc)


GpuTiming = tuple[torch.cuda.Event, torch.cuda.Event]


class GpuSteps:
    """The GPU time of decode steps a stage did not wait for: CUDA events around each, added to
    the stage's statistics once the GPU has run the step."""

    def __init__(self) -> None:
        self._free: list[GpuTiming] = []
        self._running: collections.deque[GpuTiming] = collections.deque()
        self._seen = 0
        self._untimed = 0  # steps since the last collect that were not timed
        self._timed: tuple[int, float] = (0, 0.0)  # every timed step so far, and their seconds

    def begin(self) -> GpuTiming | None:
        """Events around the next step sent early, if it is one to time (the first ones, then one
        in a few); None if not."""
        self._seen += 1
        if self._seen > TIME_FIRST and self._seen % TIME_EVERY:
            self._untimed += 1
            return None
        pair = self._free.pop() if self._free else (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        pair[0].record()
        return pair

    def end(self, pair: GpuTiming | None) -> None:
        if pair is not None:
            pair[1].record()
            self._running.append(pair)

    def collect(self) -> tuple[int, float]:
        """Steps the GPU has finished since the last call, and their seconds; those not timed
        count at the timed ones' mean, so a stage's count of steps stays whole."""
        steps, seconds = 0, 0.0
        while self._running and self._running[0][1].query():
            start, end = pair = self._running.popleft()
            steps, seconds = steps + 1, seconds + start.elapsed_time(end) / 1e3
            self._free.append(pair)
        timed = self._timed = (self._timed[0] + steps, self._timed[1] + seconds)
        if self._untimed and timed[0]:
            steps, seconds = steps + self._untimed, seconds + self._untimed * timed[1] / timed[0]
            self._untimed = 0
        return steps, seconds

