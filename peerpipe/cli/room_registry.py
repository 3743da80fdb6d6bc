"""Rooms this machine takes part in, so ``peerpipe status`` and ``plan`` find them without a code.

``host`` and ``join`` each write one small file (readable by this user only) with the room's code
and the host's address, and remove it when they end. The code is the room's secret, so the
file is as private as an SSH key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from peerpipe.errors import PeerpipeError
from peerpipe.paths import cache_dir


@dataclass(frozen=True)
class RoomEntry:
    code: str
    host: str  # host:port of the room's host
    role: str
    pid: int


def rooms_dir() -> Path:
    return cache_dir() / "rooms"


@contextlib.contextmanager
def registered(code: str, host: str, role: str) -> Iterator[Callable[[str], None]]:
    """This process's entry while the block runs; the yielded function records a new code. The
    entry is a convenience: a cache folder that cannot be written costs only a warning (``status``
    then needs ``--room``), never the room."""
    folder = rooms_dir()
    path = folder / f"{role}-{os.getpid()}.json"
    failed: list[OSError] = []

    def write(code: str) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"code": code, "host": host, "role": role, "pid": os.getpid()}, f)
        except OSError as exc:
            if not failed:
                failed.append(exc)
                print(
                    f"peerpipe: warning: cannot note this room in {folder} ({exc.strerror or exc}): "
                    "peerpipe status will need --room",
                    file=sys.stderr,
                )

    write(code)
    try:
        yield write
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_rooms() -> list[RoomEntry]:
    entries = []
    for path in sorted(rooms_dir().glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            entry = RoomEntry(str(raw["code"]), str(raw["host"]), str(raw["role"]), int(raw["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(entry.pid):
            entries.append(entry)
        else:
            path.unlink(missing_ok=True)  # left behind by a process that was killed
    return entries


def the_room() -> RoomEntry:
    """The one room this machine is in, or an error that says what to pass instead."""
    rooms = live_rooms()
    codes = {r.code for r in rooms}
    if not rooms:
        raise PeerpipeError("this machine is in no room; pass --code CODE (and --peer HOST:PORT)")
    if len(codes) > 1:
        raise PeerpipeError(
            f"this machine is in {len(codes)} rooms; pick one with --code (nameplates: "
            + ", ".join(sorted(c.split("-")[0] for c in codes))
            + ")"
        )
    hosts = [r for r in rooms if r.role == "host"]
    return hosts[0] if hosts else rooms[0]


def locate_host(code: str, nameplate: int, timeout_s: float) -> tuple[str, int]:
    """Where the host of room ``code`` listens: this machine's own rooms first, else mDNS on the
    interface of the default route, as ``join`` looks (``--peer`` where multicast is blocked)."""
    from peerpipe.cli.args import parse_address
    from peerpipe.room import default_lan_ip, find_host
    from peerpipe.transport import run

    known = [r for r in live_rooms() if r.code == code]
    if known:
        return parse_address(known[0].host)
    found = run(find_host(nameplate, timeout_s, default_lan_ip()))
    return found.address, found.port

