"""Ctrl-C (SIGINT) and SIGTERM while a command starts: it stops at once, says it was interrupted
and exits 130, whatever it was waiting for (measuring, a handshake, a room that never answers)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator

import pytest

from tests.room.roomproc import RoomProc


@pytest.fixture
def silent_peer() -> Iterator[socket.socket]:
    """A TCP server that accepts and never says a word: a handshake with it waits."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        yield server


def interrupted(proc: RoomProc, sig: signal.Signals = signal.SIGINT) -> None:
    proc.proc.send_signal(sig)
    assert proc.wait(timeout=15) == 130
    proc.unread()
    rest = proc.stderr() + "\n".join(proc.seen)
    assert "interrupted" in rest and "Traceback" not in rest, rest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_join_waiting_for_a_handshake(procs: list[RoomProc], silent_peer: socket.socket, sig: signal.Signals) -> None:
    port = silent_peer.getsockname()[1]
    join = RoomProc("join", "7-amber-falcon", "--peer", f"127.0.0.1:{port}", "--quick")
    procs.append(join)
    conn, _ = silent_peer.accept()  # it is in the handshake now, waiting for us
    with conn:
        interrupted(join, sig)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "hi", "--room", "7-amber-falcon"],
        ["status", "--code", "7-amber-falcon"],
        ["plan", "--model", "austen", "--code", "7-amber-falcon"],
    ],
)
def test_clients_waiting_for_a_host(procs: list[RoomProc], silent_peer: socket.socket, command: list[str]) -> None:
    port = silent_peer.getsockname()[1]
    client = RoomProc(*command, "--peer", f"127.0.0.1:{port}")
    procs.append(client)
    conn, _ = silent_peer.accept()
    with conn:
        interrupted(client)


def test_host_while_it_measures(procs: list[RoomProc], tmp_path) -> None:  # type: ignore[no-untyped-def]
    # An empty cache: the host measures this machine after printing its code (seconds on a CPU).
    host = RoomProc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--http", "off", env={"PEERPIPE_CACHE": str(tmp_path)}
    )
    procs.append(host)
    host.expect(r"^listening on ")
    interrupted(host)
    assert not any(line.startswith("this node:") for line in host.seen), "it finished starting first"


def test_demo_while_it_starts(procs: list[RoomProc]) -> None:
    demo = RoomProc("demo", "--http", "127.0.0.1:0", merge_stderr=True)
    procs.append(demo)
    demo.expect(r"^room code: ")  # members are joining, the room is not planned yet
    interrupted(demo)
    assert not any("serving" in line for line in demo.seen)
