"""A CPU stage whose process runs on one core runs its decode steps on the event loop's thread
(the compute thread could not run beside it: handing a step over costs two thread hops) once a
few have shown them short, its prompts still on the compute thread, and answers as it does off
one core."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from peerpipe.inference.stage_server import StageServer
from peerpipe.inference.stage_sessions import INLINE_AFTER, INLINE_MAX_S, StageStats
from tests.inference.stage_steps import servers, steps

ROUNDS = [1, 3, 1, 2, 1, 1, 2, 3]  # answers in each decode round; every stage runs each round once

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")


def _run(path, pinned: bool) -> list:  # type: ignore[no-untyped-def]
    cores = os.sched_getaffinity(0)
    if pinned:
        os.sched_setaffinity(0, {min(cores)})  # this thread: where the stages are made, and the loop runs
    try:
        first, last, sent = servers(path, device="cpu")
        assert first._inline is pinned and last._inline is pinned
        return asyncio.run(steps(first, last, sent, ROUNDS))
    finally:
        os.sched_setaffinity(0, cores)


def test_decode_steps_run_on_the_loop_thread_on_one_core(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    forwards: list[tuple[str, int, bool]] = []  # (stage, thread, a decode step) of every forward
    real = StageServer._forward_tensors

    def recorded(self, requests, *args):  # type: ignore[no-untyped-def]
        forwards.append((self.label, threading.get_ident(), requests[0].start_pos > 0))
        return real(self, requests, *args)

    monkeypatch.setattr(StageServer, "_forward_tensors", recorded)
    pinned = _run(path, True)
    loop_thread = threading.get_ident()  # asyncio.run runs its loop on the calling thread
    for label in {f[0] for f in forwards}:
        on_loop = [thread == loop_thread for name, thread, decode in forwards if name == label and decode]
        # The first few on the compute thread, to time them; the rest inline.
        assert on_loop == [False] * INLINE_AFTER + [True] * (len(ROUNDS) - INLINE_AFTER)
    assert loop_thread not in {t for _, t, decode in forwards if not decode}  # prompts: the compute thread
    forwards.clear()
    free = _run(path, False)
    assert loop_thread not in {t for _, t, _ in forwards}
    assert pinned == free and len(pinned) > 3


@pytest.mark.parametrize(
    ("steps", "seconds", "short"),
    [(0, 0.0, False), (INLINE_AFTER - 1, 0.001, False), (INLINE_AFTER, 0.001, True),
     (10, 10 * INLINE_MAX_S * 1.01, False), (10, 10 * INLINE_MAX_S * 0.99, True)],
)
def test_only_short_measured_steps_hold_the_loop(steps: int, seconds: float, short: bool) -> None:
    assert StageStats(steps, seconds).short() is short
