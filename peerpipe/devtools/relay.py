"""A TCP relay on loopback that a test or benchmark can cut: both sockets stay open and nothing
passes (no FIN, no RST), as a pulled cable or a dead Wi-Fi link looks to both ends; once healed,
what was held back flows on, as TCP would retransmit it."""

from __future__ import annotations

import asyncio

Address = tuple[str, int]


class Relay:
    def __init__(self, target: Address) -> None:
        self.target = target
        self._up = asyncio.Event()
        self._up.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def cut(self) -> None:
        self._up.clear()

    def heal(self) -> None:
        self._up.set()

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(1 << 16):
            await self._up.wait()  # while cut, hold this and read no more: the sender's buffers fill
            dst.write(data)
            await dst.drain()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
