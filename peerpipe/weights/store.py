"""Fetched weights on disk: ``cache_dir()/models/<manifest id>/`` in Hugging Face layout.

Every group of tensors (a layer, or one other tensor such as the embedding) is one safetensors
file. While it is being fetched it is ``<file>.part``, laid out in full from the start (the
manifest gives every shape), with a ``.verified`` list of the tensors whose sha256 matched: an
interrupted fetch resumes from there. Only a group whose every tensor matched is renamed to its
final name and listed in ``model.safetensors.index.json``, so the loader never sees a byte that
was not checked. The part's bytes reach the disk before the list names them (a resume after a
crash trusts the list), and a finished group's size and mtime are kept beside it (``.stamp``): a
file changed since is not held until ``audit`` has hashed it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from peerpipe.logs import Report
from peerpipe.paths import cache_dir
from peerpipe.weights.errors import DiskSpaceError, WeightsError
from peerpipe.weights.local_copy import Located, hash_range
from peerpipe.weights.manifest import Manifest, TensorRecord, file_key

INDEX = "model.safetensors.index.json"
MANIFEST = "peerpipe-manifest.json"
SPARE_BYTES = 64 * 1024 * 1024  # left free on the disk after a fetch


def store_root(manifest_id: str, base: Path | None = None) -> Path:
    """Where copy ``manifest_id`` is kept: under ``base``, by default ``cache_dir()/models``."""
    return (base or cache_dir() / "models") / manifest_id


class Store:
    def __init__(self, manifest: Manifest, base: Path | None = None) -> None:
        self.manifest = manifest
        self.root = store_root(manifest.id, base)
        self.load_path = self.root  # what the loader takes: this folder
        self.groups: dict[str, list[TensorRecord]] = {}
        for t in sorted(manifest.tensors, key=lambda t: t.name):
            self.groups.setdefault(t.group, []).append(t)
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, dict[str, int]] = {}

    def open(self) -> None:
        make_root(self.root, self.manifest)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- what is here -----------------------------------------------------------------------

    def path(self, group: str) -> Path:
        return self.root / f"peerpipe-{group}.safetensors"

    def _part(self, group: str) -> Path:
        return self.root / f"peerpipe-{group}.safetensors.part"

    def _verified_file(self, group: str) -> Path:
        return self.root / f"peerpipe-{group}.safetensors.verified"

    def _stamp_file(self, group: str) -> Path:
        return self.root / f"peerpipe-{group}.safetensors.stamp"

    def complete(self, group: str) -> bool:
        """Finished, and not changed on disk since (a changed file waits for ``audit``). A file
        with no stamp was finished before stamps were kept (or just before its stamp was
        written): it counts, as it did."""
        final = self.path(group)
        try:
            kept = self._stamp_file(group).read_text()
        except FileNotFoundError:
            return final.is_file()
        except OSError:
            return False
        try:
            return json.loads(kept) == stamp(final)
        except (OSError, ValueError):
            return False

    def verified(self, group: str) -> set[str]:
        if self.complete(group):
            return {t.name for t in self.groups[group]}
        try:
            names = json.loads(self._verified_file(group).read_text())
        except (OSError, ValueError):
            return set()
        return {n for n in names if isinstance(n, str)} if self._part(group).is_file() else set()

    def has_file(self, name: str) -> bool:
        return (self.root / name).is_file()

    def held_layers(self) -> list[int]:
        return sorted(
            int(g.split("-")[1]) for g in self.groups if g.startswith("layer-") and self.complete(g)
        )

    def locate(self, name: str) -> Located | None:
        """Where a verified tensor or file lies here (to serve it to a peer), or None."""
        if name.startswith("file/"):
            record = next((f for f in self.manifest.files if file_key(f.name) == name), None)
            return (
                Located(self.root / record.name, 0, record.nbytes)
                if record and self.has_file(record.name)
                else None
            )
        record = self.manifest.by_name().get(name)
        if record is None:
            return None
        group = record.group
        if self.complete(group):
            return Located(self.path(group), self._layout(group)[name], record.nbytes)
        if name in self.verified(group):
            return Located(self._part(group), self._layout(group)[name], record.nbytes)
        return None

    def missing_bytes(self, names: list[str]) -> int:
        by_name = self.manifest.by_name()
        need = {by_name[n].group for n in names}
        # A part is sparse: what it lacks still takes disk when it comes.
        return sum(t.nbytes for g in need for t in self.groups[g] if t.name not in self.verified(g))

    def check_space(self, names: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        need_space(self.root, self.missing_bytes(names))

    # -- writing ----------------------------------------------------------------------------

    def _layout(self, group: str) -> dict[str, int]:
        """Each tensor's absolute offset in the group's file (and the header, computed once)."""
        if group not in self._offsets:
            self._offsets[group] = _layout(self.groups[group])[1]
        return self._offsets[group]

    def _fd(self, group: str) -> int:
        if group not in self._fds:
            part = self._part(group)
            fresh = not part.is_file()
            fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
            if fresh:
                header, _ = _layout(self.groups[group])
                try:
                    os.ftruncate(fd, len(header) + sum(t.nbytes for t in self.groups[group]))
                    os.pwrite(fd, header, 0)
                except OSError as exc:
                    os.close(fd)
                    part.unlink(missing_ok=True)
                    raise write_error(self.root, exc) from exc
            self._fds[group] = fd
        return self._fds[group]

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        """Put bytes ``[offset, offset + len(data))`` of tensor ``name`` in place (not yet verified)."""
        record = self.manifest.tensor(name)
        if offset < 0 or offset + len(data) > record.nbytes:
            raise WeightsError(
                f"bytes {offset}..{offset + len(data)} lie outside tensor {name} ({record.nbytes} bytes)"
            )
        try:
            os.pwrite(self._fd(record.group), data, self._layout(record.group)[name] + offset)
        except OSError as exc:
            raise write_error(self.root, exc) from exc

    def matches(self, name: str) -> bool:
        """Whether the bytes written for ``name`` hash to the manifest's (safe to run in a thread)."""
        record = self.manifest.tensor(name)
        self._fd(record.group)
        return hash_range(self._part(record.group), self._layout(record.group)[name], record.nbytes) == record.sha256

    def mark_verified(self, name: str) -> None:
        """Record that ``name`` matched; the group's last tensor completes the group (one caller at a time)."""
        group = self.manifest.tensor(name).group
        if self.complete(group):
            return  # finished already (by another process sharing this cache): never replaced
        verified = self.verified(group) | {name}
        if len(verified) == len(self.groups[group]):
            self._finish(group)
        else:
            os.fsync(self._fd(group))  # the list is trusted after a crash: its bytes go first
            write_atomic(self._verified_file(group), json.dumps(sorted(verified)).encode(), durable=True)

    def check(self, name: str) -> bool:
        """``matches``, recorded when so."""
        if not self.matches(name):
            return False
        self.mark_verified(name)
        return True

    def _finish(self, group: str) -> None:
        fd = self._fd(group)
        del self._fds[group]
        os.fsync(fd)
        os.close(fd)
        self._part(group).replace(self.path(group))
        write_atomic(self._stamp_file(group), json.dumps(stamp(self.path(group))).encode(), durable=True)
        self._verified_file(group).unlink(missing_ok=True)
        self._index()

    def audit(self, names: list[str], report: Report) -> None:
        """Hash again each finished group of ``names`` whose file changed since it was finished:
        a good one is stamped anew; one that lost tensors goes back to being a part, with only its
        good tensors verified, so a fetch replaces the rest; one whose length or header changed
        is fetched again whole."""
        by_name = self.manifest.by_name()
        for group in sorted({by_name[n].group for n in names}):
            final = self.path(group)
            if not final.is_file() or self.complete(group):
                continue
            header, layout = _layout(self.groups[group])
            size = len(header) + sum(t.nbytes for t in self.groups[group])
            if final.stat().st_size != size or hash_range(final, 0, len(header)) != hashlib.sha256(header).hexdigest():
                report(f"{final.name} changed on disk since it was fetched (its length or header): fetching it again")
                final.unlink()
            else:
                good = {t.name for t in self.groups[group] if hash_range(final, layout[t.name], t.nbytes) == t.sha256}
                if len(good) == len(self.groups[group]):
                    write_atomic(self._stamp_file(group), json.dumps(stamp(final)).encode(), durable=True)
                    continue
                report(
                    f"{final.name} changed on disk since it was fetched: {len(self.groups[group]) - len(good)} "
                    "of its tensors no longer match, fetching them again"
                )
                write_atomic(self._verified_file(group), json.dumps(sorted(good)).encode(), durable=True)
                final.replace(self._part(group))
            self._stamp_file(group).unlink(missing_ok=True)
        self._index()

    def seal(self) -> None:
        """A fetch ended (each group was stamped as it finished): the index lists what is here."""
        with contextlib.suppress(WeightsError):  # (a full disk: the fetch's own error says so)
            self._index()

    def _index(self) -> None:
        # Processes of one machine may share the cache: the index is rebuilt from the files on
        # disk under a lock, so the last rebuild sees every group renamed before it.
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            weight_map = {t.name: self.path(g).name for g, ts in self.groups.items() if self.complete(g) for t in ts}
            index = json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1).encode()
            write_atomic(self.root / INDEX, index)

    def put_file(self, name: str, data: bytes) -> None:
        write_atomic(self.root / name, data)


def _layout(tensors: list[TensorRecord]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, object] = {}
    starts: dict[str, int] = {}
    at = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        starts[t.name] = at
        at += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    base = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {name: base + at for name, at in starts.items()}


def make_root(root: Path, manifest: Manifest) -> None:
    """A copy's folder, with its manifest (what ``existing_store`` finds next time)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(root, exc) from exc
    if not (root / MANIFEST).is_file():
        write_atomic(root / MANIFEST, manifest.to_json())


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """``path`` holds ``data`` whole or not at all; ``durable``: on the disk before this returns."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path.parent, exc) from exc


def need_space(root: Path, need: int) -> None:
    """Raise ``DiskSpaceError`` unless ``need`` bytes (and a margin) fit on ``root``'s disk."""
    free = shutil.disk_usage(root).free
    if need + SPARE_BYTES > free:
        raise DiskSpaceError(
            f"fetching needs {need / 1e9:.2f} GB in {root}, but only {free / 1e9:.2f} GB is free: "
            "free space (peerpipe models rm NAME) or point PEERPIPE_CACHE at a larger disk"
        )


def write_error(where: Path, exc: OSError) -> WeightsError:
    import errno

    if exc.errno == errno.ENOSPC:
        return DiskSpaceError(
            f"the disk holding {where} is full: free space or point PEERPIPE_CACHE at a larger disk"
        )
    return WeightsError(f"cannot write fetched weights in {where}: {exc}")

