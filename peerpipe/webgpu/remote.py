"""A browser tab's WebGPU as an ``Executor``: the same stage program as a local adapter's, its
buffers, writes and dispatch lists sent over the sealed link (``browser_link.py``) to the tab's
``static/node.js``, which runs them with the same WGSL. A forward is one round trip.

The stage calls the executor from a worker thread (it blocks on the tab's answer); the link's
frames are sealed and sent in order by one task on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from peerpipe.webgpu.browser_link import BrowserLinkError, Sealer
from peerpipe.webgpu.executor import Dispatch, WebGPUError

log = logging.getLogger(__name__)
WRITE_PIECE = 4 << 20  # bytes per write frame
MAX_QUEUED = 64 << 20  # a writer waits while this much is queued for the tab
RUN_TIMEOUT_S = 120.0


class BrowserSession:
    """One authenticated tab: sends sealed frames in order, matches answers to requests."""

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]], inbound: Sealer, outbound: Sealer, facts: dict[str, Any]
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._send, self._in, self._out = send, inbound, outbound
        self.facts = facts  # what the tab said of its adapter at auth
        self._queue: asyncio.Queue[tuple[dict[str, Any], bytes]] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._seq = itertools.count()
        self._queued = 0
        self._room = threading.Condition()
        self.closed = asyncio.Event()
        self.error = ""

    # -- any thread ----------------------------------------------------------------------------
    def post(self, header: dict[str, Any], payload: bytes = b"") -> None:
        with self._room:
            while self._queued > MAX_QUEUED and not self.closed.is_set():
                self._room.wait(1.0)
            if self.closed.is_set():
                raise WebGPUError(f"the browser node left{': ' + self.error if self.error else ''}")
            self._queued += len(payload)
        self.loop.call_soon_threadsafe(self._queue.put_nowait, (header, payload))

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send and wait for the tab's answer (from a worker thread, never the event loop's)."""
        if threading.get_ident() == getattr(self.loop, "_thread_id", None):
            raise RuntimeError("a browser request blocks: call it from a worker thread")
        future = asyncio.run_coroutine_threadsafe(self._request(header, payload), self.loop)
        try:
            return future.result(RUN_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise WebGPUError(f"the browser node did not answer in {RUN_TIMEOUT_S:.0f} s") from None

    # -- the event loop ------------------------------------------------------------------------
    async def _request(self, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        seq = next(self._seq)
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = self.loop.create_future()
        self._waiting[seq] = future
        try:
            self._queue.put_nowait(({**header, "seq": seq}, payload))
            return await future
        finally:
            self._waiting.pop(seq, None)

    async def pump(self) -> None:
        """Seal and send queued frames in order until the link closes."""
        while True:
            header, payload = await self._queue.get()
            await self._send(self._out.seal(header, payload))
            with self._room:
                self._queued -= len(payload)
                self._room.notify_all()

    def feed(self, frame: bytes) -> dict[str, Any] | None:
        """A frame from the tab; returns it when it answers no request (a status report)."""
        header, payload = self._in.open(frame)
        seq = header.get("seq")
        if header["op"] == "error":
            message = str(header.get("message", "?"))[:2000]
            future = self._waiting.get(seq) if isinstance(seq, int) else None
            if future is None:
                raise BrowserLinkError(f"the browser node failed: {message}")
            if not future.done():
                future.set_exception(WebGPUError(f"the browser node failed: {message}"))
            return None
        if isinstance(seq, int) and seq in self._waiting:
            future = self._waiting[seq]
            if not future.done():
                future.set_result((header, payload))
            return None
        return header

    def close(self, why: str = "") -> None:
        self.error = self.error or why
        self.closed.set()
        with self._room:
            self._room.notify_all()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WebGPUError(f"the browser node left{': ' + why if why else ''}"))


class RemoteExecutor:
    """The ``Executor`` a browser tab offers."""

    remote = True

    def __init__(self, session: BrowserSession) -> None:
        facts = session.facts
        self.session = session
        self.name = str(facts.get("adapter", "browser WebGPU"))[:200] + " (browser)"
        self.has_f16 = bool(facts.get("f16", False))
        self.max_binding = int(facts.get("max_binding") or 128 << 20)
        self._ids = itertools.count()
        self._weight_type = "f32"
        # Dispatch lists the tab holds already, by the list's identity (a stage reuses its lists):
        # a forward then sends only the program's number.
        self._programs: dict[int, tuple[int, list[Dispatch]]] = {}
        self._pids = itertools.count()

    @property
    def weight_type(self) -> str:
        return self._weight_type

    @weight_type.setter
    def weight_type(self, value: str) -> None:
        self._weight_type = value
        self.session.post({"op": "wt", "wt": value})

    def buffer(self, size: int) -> int:
        if size > self.max_binding:
            raise WebGPUError(f"a buffer of {size / 1e6:.0f} MB is larger than this browser binds "
                              f"({self.max_binding / 1e6:.0f} MB)")
        ident = next(self._ids)
        self.session.post({"op": "buffer", "id": ident, "size": max(16, -(-size // 16) * 16)})
        return ident

    def free(self, buffers: list[int]) -> None:
        if buffers and not self.session.closed.is_set():
            self.session.post({"op": "free", "ids": list(buffers)})

    def write(self, buffer: int, data: bytes | memoryview, offset: int = 0) -> None:
        view = memoryview(data).cast("B")
        for at in range(0, len(view), WRITE_PIECE):
            self.session.post({"op": "write", "id": buffer, "offset": offset + at}, bytes(view[at : at + WRITE_PIECE]))

    def run(self, dispatches: list[Dispatch], reads: list[tuple[int, int]]) -> list[bytes]:
        header: dict[str, Any] = {"op": "run", "r": [list(r) for r in reads]}
        known = self._programs.get(id(dispatches))
        if known is not None and known[1] is dispatches:
            header["p"] = known[0]
        else:
            pid = next(self._pids)
            self._programs[id(dispatches)] = (pid, dispatches)
            header.update(p=pid, d=[[d.kernel, list(d.buffers), *d.groups] for d in dispatches])
        _, payload = self.session.request(header)
        if len(payload) != sum(size for _, size in reads):
            raise WebGPUError(f"the browser node sent {len(payload)} bytes for reads of {sum(s for _, s in reads)}")
        out, at = [], 0
        for _, size in reads:
            out.append(payload[at : at + size])
            at += size
        return out

    def close(self) -> None:
        pass
