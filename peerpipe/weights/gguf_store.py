"""Fetched tensors of a GGUF copy: one sparse file, ``<cache>/models/<manifest id>/<name>.gguf``,
as long as the original, with the header (checked whole) at its start and each fetched tensor at
its own offset; the bytes of tensors never fetched are holes that take no disk. The loader reads
only its stage's tensors, by offset, as from the original. ``peerpipe-verified.json`` lists the
tensors whose sha256 matched: an interrupted fetch resumes from there. A tensor's bytes reach the
disk before the list names it, and the file's size and mtime at the end of a fetch are kept
(``peerpipe-stamp.json``): a file changed since (a crash mid-fetch, an edit) has its listed
tensors hashed again before the next load (``audit``); one with no stamp yet is taken as it is."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from peerpipe.logs import Report
from peerpipe.weights.errors import ManifestError, WeightsError
from peerpipe.weights.local_copy import Located, hash_range
from peerpipe.weights.manifest import GGUF_HEADER, GGUFInfo, Manifest, TensorRecord
from peerpipe.weights.store import make_root, need_space, stamp, store_root, write_atomic, write_error

VERIFIED = "peerpipe-verified.json"
HEADER = "peerpipe-header.sha256"  # present once the header matched
STAMP = "peerpipe-stamp.json"


class GGUFStore:
    def __init__(self, manifest: Manifest, base: Path | None = None) -> None:
        assert manifest.gguf is not None
        self.manifest = manifest
        self.gguf: GGUFInfo = manifest.gguf
        self.root = store_root(manifest.id, base)
        self.groups: dict[str, list[TensorRecord]] = {}
        for t in sorted(manifest.tensors, key=lambda t: t.name):
            self.groups.setdefault(t.group, []).append(t)
        self._fd: int | None = None
        self._verified: set[str] | None = None

    @property
    def load_path(self) -> Path:
        return self.root / self.gguf.file

    def open(self) -> None:
        make_root(self.root, self.manifest)
        if self._fd is None:
            fd = os.open(self.load_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != self.gguf.nbytes:
                    os.ftruncate(fd, self.gguf.nbytes)  # sparse: only what is written takes disk
            except OSError as exc:
                os.close(fd)
                raise write_error(self.root, exc) from exc
            self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._verified = None  # read again: another process sharing the cache may add to it

    def audit(self, names: list[str], report: Report) -> None:
        """Hash every listed tensor again when the file changed since the last fetch ended;
        those that no longer match leave the list (a fetch brings them again)."""
        del names  # one file for every tensor: its stamp cannot tell which changed
        if not self.load_path.is_file() or self._stamped():
            return
        by_name = self.manifest.by_name()
        listed = [by_name[n] for n in self._names() if n in by_name]
        good = {t.name for t in listed if hash_range(self.load_path, t.offset, t.nbytes) == t.sha256}
        if len(good) < len(listed):
            report(f"{self.load_path.name} changed on disk: {len(listed) - len(good)} fetched tensors no longer match, fetching them again")
            write_atomic(self.root / VERIFIED, json.dumps(sorted(good)).encode(), durable=True)
            self._verified = good
        self.seal()

    def _stamped(self) -> bool:
        """Unchanged since the last fetch ended; a copy fetched before stamps were kept counts."""
        try:
            return json.loads((self.root / STAMP).read_text()) == stamp(self.load_path)
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return False

    def seal(self) -> None:
        """A fetch ended: what the list names is what the file holds."""
        if self.load_path.is_file():
            write_atomic(self.root / STAMP, json.dumps(stamp(self.load_path)).encode(), durable=True)

    # -- what is here -----------------------------------------------------------------------

    def _names(self) -> set[str]:
        if self._verified is None:
            try:
                names = json.loads((self.root / VERIFIED).read_text())
                self._verified = {n for n in names if isinstance(n, str)}
            except (OSError, ValueError):
                self._verified = set()
        return self._verified

    def verified(self, group: str) -> set[str]:
        return {t.name for t in self.groups[group]} & self._names()

    def complete(self, group: str) -> bool:
        return len(self.verified(group)) == len(self.groups[group])

    def held_layers(self) -> list[int]:
        return sorted(int(g.split("-")[1]) for g in self.groups if g.startswith("layer-") and self.complete(g))

    def has_file(self, name: str) -> bool:
        return name == GGUF_HEADER and (self.root / HEADER).is_file()

    def locate(self, name: str) -> Located | None:
        if name == GGUF_HEADER:
            return Located(self.load_path, 0, self.gguf.header_bytes) if self.has_file(name) else None
        record = self.manifest.by_name().get(name)
        if record is None or name not in self._names():
            return None
        return Located(self.load_path, record.offset, record.nbytes)

    def check_space(self, names: list[str]) -> None:
        by_name = self.manifest.by_name()
        need_space(self.root, sum(by_name[n].nbytes for n in names if n not in self._names()))

    # -- writing ----------------------------------------------------------------------------

    def put_file(self, name: str, data: bytes) -> None:
        """The header (already checked whole against the manifest)."""
        if name != GGUF_HEADER or len(data) != self.gguf.header_bytes:
            raise WeightsError(f"a GGUF copy takes only its header here, not {name}")
        self.open()
        self._pwrite(data, 0)
        write_atomic(self.root / HEADER, self.gguf.header_sha256.encode())

    def check_header(self) -> None:
        """The header's tensor index must say what the manifest says (it is the file the loader reads)."""
        from peerpipe.engine.errors import ModelLoadError
        from peerpipe.engine.gguf_file import tensor_bytes
        from peerpipe.engine.gguf_header import read_header

        try:
            found = {t.name: (t.offset, tensor_bytes(t)) for t in read_header(self.load_path).tensors}
        except ModelLoadError as exc:
            raise ManifestError(f"the room's GGUF header does not parse: {exc}") from exc
        listed = {t.name: (t.offset, t.nbytes) for t in self.manifest.tensors}
        if found != listed:
            raise ManifestError("the room's manifest does not match its GGUF header's tensor index")

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        record = self.manifest.tensor(name)
        if offset < 0 or offset + len(data) > record.nbytes:
            raise WeightsError(f"bytes {offset}..{offset + len(data)} lie outside tensor {name} ({record.nbytes} bytes)")
        self._pwrite(data, record.offset + offset)

    def _pwrite(self, data: bytes | memoryview, at: int) -> None:
        self.open()
        assert self._fd is not None
        try:
            os.pwrite(self._fd, data, at)
        except OSError as exc:
            raise write_error(self.root, exc) from exc

    def matches(self, name: str) -> bool:
        record = self.manifest.tensor(name)
        return hash_range(self.load_path, record.offset, record.nbytes) == record.sha256

    def mark_verified(self, name: str) -> None:
        # Processes of one machine may share the cache: merge with what is on disk, under a lock.
        if self._fd is not None:
            os.fsync(self._fd)  # the list is trusted after a crash: the bytes go first
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._verified = None
            names = self._names() | {name}
            write_atomic(self.root / VERIFIED, json.dumps(sorted(names)).encode(), durable=True)
            self._verified = names

    def check(self, name: str) -> bool:
        if not self.matches(name):
            return False
        self.mark_verified(name)
        return True
