"""A CPU stage whose process runs on one core runs its decode steps on the event loop's thread
(the compute thread could not run beside it: handing a step over costs two thread hops), its
prompts still on the compute thread, and answers as it does off one core."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from peerpipe.inference.stage_server import StageServer
from tests.inference.stage_steps import servers, steps

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")


def _run(path, pinned: bool) -> list:  # type: ignore[no-untyped-def]
    cores = os.sched_getaffinity(0)
    if pinned:
        os.sched_setaffinity(0, {min(cores)})  # this thread: where the stages are made, and the loop runs
    try:
        first, last, sent = servers(path, device="cpu")
        assert first._inline is pinned and last._inline is pinned
        return asyncio.run(steps(first, last, sent, [1, 3, 1, 2]))
    finally:
        os.sched_setaffinity(0, cores)


def test_decode_steps_run_on_the_loop_thread_on_one_core(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_model_dir("llama")
    threads: list[tuple[int, bool]] = []  # (thread, a decode step) of every forward
    real = StageServer._forward_tensors

    def recorded(self, requests, *args):  # type: ignore[no-untyped-def]
        threads.append((threading.get_ident(), requests[0].start_pos > 0))
        return real(self, requests, *args)

    monkeypatch.setattr(StageServer, "_forward_tensors", recorded)
    pinned = _run(path, True)
    loop_thread = threading.get_ident()  # asyncio.run runs its loop on the calling thread
    assert {t for t, decode in threads if decode} == {loop_thread}
    assert loop_thread not in {t for t, decode in threads if not decode}  # prompts: the compute thread
    threads.clear()
    free = _run(path, False)
    assert loop_thread not in {t for t, _ in threads}
    assert pinned == free and len(pinned) > 3
