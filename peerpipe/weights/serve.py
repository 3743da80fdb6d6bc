"""Serving weights to peers: the manifests of the copies this node holds (its own folder, and
what it fetched), and byte ranges of their verified tensors and files."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from peerpipe.protocol import ManifestReply, ManifestRequest, WeightReply, WeightRequest
from peerpipe.room import LINK_ERRORS, Send
from peerpipe.weights.local_copy import Located
from peerpipe.weights.manifest import Manifest

log = logging.getLogger(__name__)
Locate = Callable[[str], "Located | None"]


@dataclass
class _Copy:
    manifest: Manifest
    locate: Locate
    raw: bytes  # the manifest as sent


class WeightServer:
    """``corrupt`` (a test hook, ``PEERPIPE_TEST_CORRUPT_WEIGHTS=1``) flips a byte of every piece
    sent, so tests can watch the fetching node refuse them."""

    def __init__(self, send: Send, *, corrupt: bool = False) -> None:
        self.send = send
        self.corrupt = corrupt
        self.busy: Callable[[], bool] = lambda: False  # answers pass through this node now (its data plane says)
        self.bytes_sent = 0
        self._copies: dict[str, _Copy] = {}

    def add(self, manifest: Manifest, locate: Locate) -> None:
        self._copies[manifest.id] = _Copy(manifest, locate, manifest.to_json())

    def holds(self, manifest_id: str) -> bool:
        return manifest_id in self._copies

    async def serve(self, peer: str, message: ManifestRequest | WeightRequest) -> None:
        reply = await self._answer(message)
        try:
            await self.send(peer, reply)
        except LINK_ERRORS as exc:  # the asker left: its fetch goes on elsewhere
            log.info("cannot send weights to %s: %s", peer[:8], exc)
            return
        if isinstance(reply, WeightReply):
            self.bytes_sent += len(reply.data)

    async def _answer(self, message: ManifestRequest | WeightRequest) -> ManifestReply | WeightReply:
        copy = self._copies.get(message.manifest_id)
        if isinstance(message, ManifestRequest):
            if copy is None:
                return ManifestReply(
                    message.request_id, error=f"this node holds no copy {message.manifest_id}"
                )
            return ManifestReply(message.request_id, copy.raw)
        at = copy.locate(message.name) if copy is not None else None
        if at is None:
            return WeightReply(message.request_id, error=f"{message.name} is not held here")
        if message.offset + message.length > at.nbytes:
            return WeightReply(message.request_id, error=f"bytes past the end of {message.name}")
        try:
            data = await asyncio.to_thread(_read, at, message.offset, message.length)
        except OSError as exc:
            return WeightReply(message.request_id, error=f"cannot read {message.name}: {exc}")
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return WeightReply(message.request_id, data, busy=self.busy())


def _read(at: Located, offset: int, length: int) -> bytes:
    fd = os.open(at.path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, at.offset + offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(f"{at.path} is shorter than its header says")
    return data
