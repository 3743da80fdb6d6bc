"""Hidden states between processes of one machine, through shared memory instead of the
encrypted socket: the bytes never leave the machine, so they skip encryption and the kernel's
socket copies. Only a 40-byte reference travels on the room's channel.

A sender owns a ``Ring``: one file in ``/dev/shm`` (mode 0600, so only this user's processes
open it) cut into allocations, each a 64-byte header and the tensor's bytes. The receiver maps
the file (``Segments``), checks the reference against the header, copies the bytes out and
marks the allocation released; the sender reuses space once every older allocation is released.
A full ring is no reason to wait: ``alloc`` returns None and the caller sends inline.

An allocation may be handed out *pending*: a GPU's copy will fill it, and then write the header's
state byte (``STATE_AT``) as ``WRITTEN``; the reference travels before the copy has run. A
reader waits (at most ``PENDING_S``) for the state to turn. A sender whose step failed marks it
so (``Ring.mark``), and a reader then fails at once.

Which nodes share memory: ``machine_id()`` names this machine's /dev/shm (boot, device and inode
of the mount); two nodes with the same id map the same files.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import mmap
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from peerpipe.protocol.tensor import SHM_REF_BYTES
from peerpipe.transport.errors import TransportError

T = TypeVar("T")

SHM_DIR = Path("/dev/shm")
HEADER = 64
ALIGN = 64
DEFAULT_CAPACITY = 64 << 20
REF = struct.Struct("<24sQQ")  # segment name, offset of the allocation's header, sequence number
REF_BYTES = REF.size
assert REF_BYTES == SHM_REF_BYTES
_HEAD = struct.Struct("<QQB")  # sequence, payload bytes, state
_WRITTEN, _RELEASED, _ABANDONED, _PENDING, _FAILED = 1, 2, 3, 4, 5
WRITTEN = _WRITTEN
STATE_AT = _HEAD.size - 1  # the state byte's place in an allocation's header
# How long a reader waits for a pending allocation: a decode step's copy off a GPU takes
# milliseconds; past this its sender is gone or stuck.
PENDING_S = 10.0
# An allocation nobody read for this long is given up (its reader dropped the message): a late
# reader finds it marked and fails rather than read bytes that may be reused.
ABANDON_S = 30.0
_NAME = re.compile(r"^peerpipe-(\d{1,10})-[0-9a-f]{6,8}$")
_MAX_OPEN = 16


class SharedMemoryError(TransportError):
    """A shared-memory reference that cannot be read: the segment is gone, not this user's, or
    the reference does not match what the sender wrote there."""


def machine_id() -> str:
    """What names this machine's shared memory; "" where there is none (not Linux)."""
    try:
        st = os.stat(SHM_DIR)
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:16]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    offset: int
    seq: int

    def pack(self) -> bytes:
        return REF.pack(self.name.encode("ascii"), self.offset, self.seq)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Ref:
        if len(data) != REF_BYTES:
            raise SharedMemoryError(f"a shared-memory reference is {REF_BYTES} bytes, not {len(data)}")
        raw, offset, seq = REF.unpack(data)
        try:
            name = raw.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if not _NAME.match(name):
            raise SharedMemoryError(f"{raw!r} is not a peerpipe shared-memory segment")
        return cls(name, offset, seq)


def segment_name(pid: int) -> str:
    """A ring's file name: its process, and 6 random hex digits (a reference holds 24 bytes of
    name, enough for any pid up to Linux's largest, 4194304)."""
    return f"peerpipe-{pid}-{secrets.token_hex(3)}"


def _remove_stale() -> None:
    """Segments of processes that died without removing theirs."""
    for path in SHM_DIR.glob("peerpipe-*"):
        m = _NAME.match(path.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
        except (PermissionError, OverflowError):
            pass


class Ring:
    """The sending side: one segment, allocations handed out in order."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        _remove_stale()
        self.name = segment_name(os.getpid())
        self.path = SHM_DIR / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, capacity)
            self.mm = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        self.capacity = capacity
        self.view = memoryview(self.mm)
        self._live: collections.deque[tuple[int, int, float]] = collections.deque()  # (offset, length, when)
        self._head = 0
        self._seq = 0

    def alloc(self, nbytes: int, *, pending: bool = False) -> tuple[Ref, memoryview] | None:
        """A reference and the writable bytes behind it; None when the ring has no room now.
        ``pending``: the bytes are written later, by a copy that then marks the state WRITTEN."""
        self._reclaim()
        need = HEADER + _align(nbytes)
        at = self._place(need)
        if at is None:
            return None
        self._seq += 1
        _HEAD.pack_into(self.mm, at, self._seq, nbytes, _PENDING if pending else _WRITTEN)
        self._live.append((at, need, time.monotonic()))
        self._head = at + need
        return Ref(self.name, at, self._seq), self.view[at + HEADER : at + HEADER + nbytes]

    def mark(self, ref: Ref, *, written: bool = True) -> None:
        """A pending allocation's bytes are in (``written``), or will never be: a reader waiting
        for it then fails at once instead of at ``PENDING_S``."""
        if self.mm[ref.offset + STATE_AT] == _PENDING and _HEAD.unpack_from(self.mm, ref.offset)[0] == ref.seq:
            self.mm[ref.offset + STATE_AT] = _WRITTEN if written else _FAILED

    def _place(self, need: int) -> int | None:
        if need > self.capacity:
            return None
        if not self._live:
            return 0
        tail = self._live[0][0]
        if self._head > tail:  # free: [head, capacity) and [0, tail)
            if self._head + need <= self.capacity:
                return self._head
            return 0 if need <= tail else None
        return self._head if self._head + need <= tail else None

    def _reclaim(self) -> None:
        stale = time.monotonic() - ABANDON_S
        while self._live:
            at, _, when = self._live[0]
            state = self.mm[at + STATE_AT]
            if state not in (_RELEASED, _FAILED) and when > stale:
                return
            if state != _FAILED:  # (a late reader learns why)
                self.mm[at + STATE_AT] = _ABANDONED
            self._live.popleft()

    @property
    def in_flight(self) -> int:
        self._reclaim()
        return len(self._live)

    def close(self) -> None:
        for at, _, _ in self._live:  # readers waiting for a copy that will never come fail at once
            if self.mm[at + STATE_AT] == _PENDING:
                self.mm[at + STATE_AT] = _FAILED
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.view.release()
        with contextlib.suppress(BufferError):
            self.mm.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.path.unlink()


class Segments:
    """The receiving side: segments mapped by name (the last few), each reference checked."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()
        self._lock = threading.Lock()  # stages read on the event loop and on the compute thread

    def _map(self, name: str) -> mmap.mmap:
        mm = self._open.get(name)
        if mm is not None:
            self._open.move_to_end(name)
            return mm
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise SharedMemoryError(f"cannot open shared memory {name}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise SharedMemoryError(f"shared memory {name} is not private to this user")
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        self._open[name] = mm
        while len(self._open) > _MAX_OPEN:
            with contextlib.suppress(BufferError):  # one being read closes when its reader is done
                self._open.popitem(last=False)[1].close()
        return mm

    def written(self, ref: Ref) -> bool:
        """Whether the bytes behind ``ref`` are there to read (False while a pending copy runs)."""
        with self._lock:
            mm = self._map(ref.name)
        if not 0 <= ref.offset <= len(mm) - HEADER:
            return True
        seq, _, state = _HEAD.unpack_from(mm, ref.offset)
        return seq != ref.seq or state != _PENDING  # (another allocation's: reading it fails, typed)

    def read(self, ref: Ref, nbytes: int, copy: Callable[[memoryview], T]) -> T:
        """``copy`` of the ``nbytes`` behind ``ref`` (it must copy them: the view is gone after);
        from then on the sender may reuse them. Waits for a pending allocation to be written."""
        with self._lock:
            mm = self._map(ref.name)
        if not 0 <= ref.offset <= len(mm) - HEADER - nbytes:
            raise SharedMemoryError(f"reference at {ref.offset} (+{nbytes}) lies outside {ref.name}")
        state_at = ref.offset + STATE_AT
        if mm[state_at] == _PENDING and _HEAD.unpack_from(mm, ref.offset)[0] == ref.seq:  # (else refused below)
            deadline = time.monotonic() + PENDING_S
            while mm[state_at] == _PENDING:
                if time.monotonic() > deadline:
                    raise SharedMemoryError(f"{ref.name} at {ref.offset} was not written within {PENDING_S:.0f} s")
        self._check(mm, ref, nbytes)
        start = ref.offset + HEADER
        with memoryview(mm) as whole, whole[start : start + nbytes] as view:
            out = copy(view)
        self._check(mm, ref, nbytes)  # the sender did not give the bytes up while they were copied
        mm[state_at] = _RELEASED
        return out

    @staticmethod
    def _check(mm: mmap.mmap, ref: Ref, nbytes: int) -> None:
        seq, size, state = _HEAD.unpack_from(mm, ref.offset)
        if seq == ref.seq and state == _FAILED:
            raise SharedMemoryError(f"{ref.name} at {ref.offset} was given up by its sender: its step failed")
        if seq != ref.seq or size != nbytes or state != _WRITTEN:
            raise SharedMemoryError(
                f"{ref.name} at {ref.offset} holds allocation {seq} of {size} bytes ({state=}), "
                f"not {ref.seq} of {nbytes}: a stale or forged reference"
            )

    def close(self) -> None:
        for mm in self._open.values():
            with contextlib.suppress(BufferError):
                mm.close()
        self._open.clear()
