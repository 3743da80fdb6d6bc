"""Fetching a stage's weights from peers: pieces of tensors asked of holders (the host first,
then members with a verified copy), several in flight, each tensor checked against the
manifest's sha256 before it counts. A holder that leaves or stops answering hands its pieces to
the next; a tensor whose bytes do not match is fetched again from a holder that did not send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peerpipe.logs import Report, log_reporter
from peerpipe.protocol import ManifestReply, ManifestRequest, Message, WeightReply, WeightRequest
from peerpipe.room import LINK_ERRORS, Send
from peerpipe.weights.errors import FetchError, HolderGone, ManifestError
from peerpipe.weights.local_copy import Located
from peerpipe.weights.manifest import GGUF_HEADER, Manifest, file_key
from peerpipe.weights.store import Store, write_error

if TYPE_CHECKING:
    from peerpipe.weights.gguf_store import GGUFStore
from peerpipe.weights.transfer import PIECE, Transfer, in_thread

log = logging.getLogger(__name__)
REPLY_TIMEOUT_S = 30.0
REPORT_EVERY_S = 1.0
LOCK_POLL_S = 0.2


@dataclass
class FetchStats:
    bytes_received: int = 0
    bad_tensors: int = 0  # tensors whose bytes did not match the manifest, fetched again
    holders_lost: int = 0
    copied_locally: int = 0  # bytes taken from this node's own (older) copy instead of the network


class _Progress:
    def __init__(self, report: Report, what: str, total: int) -> None:
        self.report, self.what, self.total = report, what, total
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY_S or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-6)
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            pct = 100 * self.done // max(1, self.total)
            self.report(
                f"fetching {self.what}: {pct}% of {self.total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, {left:.0f} s left"
            )


@contextlib.asynccontextmanager
async def _sole_writer(root: Path, report: Report) -> AsyncIterator[None]:
    """This process alone writes into the copy at ``root`` meanwhile (another waits its turn,
    then fetches only what is still missing). The lock dies with its process."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / ".fetch-lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(root, exc) from exc
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    told = True
                    report("another peerpipe process of this machine is fetching into the same copy: waiting for it")
                # A file lock has no event to await, and a thread blocked in flock would outlive a cancel.
                await asyncio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)


class Fetcher:
    """One node's requests for weights; replies come in through ``on_reply``."""

    def __init__(self, send: Send, report: Report | None = None) -> None:
        self.send = send
        self.report = report or log_reporter(log)
        self.stats = FetchStats()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Message]]] = {}

    def on_reply(self, peer: str, message: ManifestReply | WeightReply) -> None:
        entry = self._pending.get(message.request_id)
        if entry is None or entry[0] != peer:
            return  # late (timed out) or from someone not asked: dropped
        if not entry[1].done():
            entry[1].set_result(message)

    def peer_left(self, peer: str) -> None:
        for holder, future in list(self._pending.values()):
            if holder == peer and not future.done():
                future.set_exception(HolderGone(f"{peer[:8]} left"))

    async def _ask(self, peer: str, message: ManifestRequest | WeightRequest) -> Message:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = (peer, future)
        try:
            await self.send(peer, message)
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                return await future
        except (*LINK_ERRORS, TimeoutError) as exc:
            raise HolderGone(f"{peer[:8]} stopped answering: {exc or 'timed out'}") from None
        finally:
            self._pending.pop(message.request_id, None)

    async def manifest(self, manifest_id: str, holders: Sequence[str]) -> Manifest:
        errors = []
        for holder in holders:
            try:
                reply = await self._ask(holder, ManifestRequest(next(self._ids), manifest_id))
            except HolderGone as exc:
                errors.append(str(exc))
                continue
            assert isinstance(reply, ManifestReply)
            if reply.error:
                errors.append(f"{holder[:8]}: {reply.error}")
                continue
            try:
                return Manifest.from_json(reply.data, manifest_id)
            except ManifestError as exc:
                errors.append(f"{holder[:8]} sent a bad manifest: {exc}")
        raise FetchError(
            f"no peer could send the room's manifest {manifest_id}: {'; '.join(errors) or 'no peers'}"
        )

    async def fetch_files(self, store: Store | GGUFStore, holders: Sequence[str]) -> None:
        """The config, tokenizer and template files this store lacks, each checked whole."""
        if (gguf := store.manifest.gguf) is not None and not store.has_file(GGUF_HEADER):
            header = await self._whole(GGUF_HEADER, gguf.header_bytes, gguf.header_sha256, store.manifest.id, holders)
            store.put_file(GGUF_HEADER, header)
        for record in store.manifest.files:
            if store.has_file(record.name):
                continue
            data = await self._whole(
                file_key(record.name), record.nbytes, record.sha256, store.manifest.id, holders
            )
            store.put_file(record.name, data)

    async def _whole(
        self, name: str, nbytes: int, sha256: str, manifest_id: str, holders: Sequence[str]
    ) -> bytes:
        import hashlib

        errors = []
        for holder in holders:
            parts = []
            try:
                for offset in range(0, nbytes, PIECE):
                    reply = await self._ask(
                        holder,
                        WeightRequest(
                            next(self._ids), manifest_id, name, offset, min(PIECE, nbytes - offset)
                        ),
                    )
                    assert isinstance(reply, WeightReply)
                    if reply.error:
                        raise HolderGone(reply.error)
                    parts.append(bytes(reply.data))
            except HolderGone as exc:
                errors.append(f"{holder[:8]}: {exc}")
                continue
            data = b"".join(parts)
            self.stats.bytes_received += len(data)
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            self.stats.bad_tensors += 1
            errors.append(f"{holder[:8]} sent bytes that do not match the manifest")
        raise FetchError(f"no peer sent a good copy of {name.removeprefix('file/')}: {'; '.join(errors)}")

    async def fetch(
        self,
        store: Store | GGUFStore,
        names: Sequence[str],
        holders: Sequence[str],
        *,
        local: tuple[Manifest, dict[str, Located]] | None = None,
        what: str = "weights",
    ) -> None:
        """Make every tensor in ``names`` verified in ``store``: from ``local`` (this node's own
        copy) where its hash matches, else from ``holders`` in order. Processes of one machine
        may share the cache: one at a time fetches into a copy, and it first hashes again what
        changed on disk since it was verified (``audit``)."""
        async with _sole_writer(store.root, self.report):
            store.close()  # what it read or opened before may have changed meanwhile
            await in_thread(store.audit, list(names), self.report)  # (a cancel seals nothing)
            try:
                await self._fetch(store, names, holders, local, what)
            finally:
                store.seal()
                store.close()

    async def _fetch(
        self,
        store: Store | GGUFStore,
        names: Sequence[str],
        holders: Sequence[str],
        local: tuple[Manifest, dict[str, Located]] | None,
        what: str,
    ) -> None:
        by_name = store.manifest.by_name()
        todo = [by_name[n] for n in names if n not in store.verified(by_name[n].group)]
        if local is not None:
            copied = [t for t in todo if await asyncio.to_thread(self._copy_local, store, t.name, local)]
            for t in copied:
                store.mark_verified(t.name)
            todo = [t for t in todo if t not in copied]
        for t in [t for t in todo if not t.nbytes]:  # nothing to fetch: only its (empty) hash to record
            store.check(t.name)
        todo = [t for t in todo if t.nbytes]
        if not todo:
            return
        progress = _Progress(self.report, what, sum(t.nbytes for t in todo))

        async def ask(holder: str, request: WeightRequest) -> WeightReply:
            reply = await self._ask(holder, dataclasses.replace(request, request_id=next(self._ids)))
            assert isinstance(reply, WeightReply)
            return reply

        await Transfer(store, todo, holders, ask, self.stats, self.report, progress.add).run()

    def _copy_local(self, store: Store | GGUFStore, name: str, local: tuple[Manifest, dict[str, Located]]) -> bool:
        """Take a tensor from this node's own copy when it is the same bytes; False when not."""
        manifest, where = local
        mine, wanted = manifest.by_name().get(name), store.manifest.tensor(name)
        at = where.get(name)
        if mine is None or at is None or mine.sha256 != wanted.sha256:
            return False
        with at.path.open("rb", buffering=0) as fh:
            for offset in range(0, at.nbytes, 8 * PIECE):
                fh.seek(at.offset + offset)
                store.write(name, offset, fh.read(min(8 * PIECE, at.nbytes - offset)))
        if not store.matches(name):
            return False
        self.stats.copied_locally += at.nbytes
        return True
