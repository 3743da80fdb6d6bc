"""``host`` and ``join`` as real processes on loopback: mDNS, --peer, wrong codes, tampering."""

from __future__ import annotations

import contextlib
import re

from roomproc import MdnsSniffer, Relay, RoomProc

CODE = "7-amber-falcon"
HANDSHAKE_BYTES = (4 + 1 + 11 + 33) + (4 + 1 + 32)  # PAKE frame + key confirmation frame


def start(procs: list[RoomProc], *args: str) -> RoomProc:
    p = RoomProc(*args)
    procs.append(p)
    return p


def start_host(procs: list[RoomProc], *extra: str) -> tuple[RoomProc, int]:
    host = start(procs, "host", "--listen", "127.0.0.1:0", "--code", CODE, "--name", "the-host", *extra)
    host.expect(rf"^room code: {CODE}$")
    port = int(host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
    return host, port


def test_host_and_two_joiners_by_mdns_and_by_peer(procs: list[RoomProc]) -> None:
    try:
        sniffer: contextlib.AbstractContextManager[MdnsSniffer | None] = MdnsSniffer()
    except (PermissionError, AttributeError, OSError):  # not root, or not Linux
        sniffer = contextlib.nullcontext()
    with sniffer as sniffing:
        _host_and_two_joiners(procs)
    if sniffing is not None:
        assert sniffing.leaks == [], "mDNS for a loopback room left on a real interface"


def _host_and_two_joiners(procs: list[RoomProc]) -> None:
    host, port = start_host(procs)
    by_mdns = start(procs, "join", "7 Amber Falcon", "--listen", "127.0.0.1", "--name", "mdns-joiner")
    by_peer = start(procs, "join", CODE, "--peer", f"127.0.0.1:{port}", "--name", "peer-joiner")
    by_mdns.expect(rf"^joined room 7: host the-host at 127\.0\.0\.1:{port}$", timeout=15)
    by_peer.expect(r"^joined room 7: host the-host", timeout=15)
    names = {host.expect(r"^joined: (\S+)").group(1) for _ in range(2)}
    assert names == {"mdns-joiner", "peer-joiner"}

    by_mdns.interrupt()  # Ctrl-C: polite goodbye, exit 0
    assert by_mdns.wait() == 0
    by_mdns.expect(r"^left the room$")
    host.expect(r"^left: mdns-joiner \(\w+\), said goodbye$")

    by_peer.proc.kill()  # no goodbye: the host notices the lost connection
    host.expect(r"^left: peer-joiner \(\w+\), lost")

    host.interrupt()
    assert host.wait() == 0
    assert "Traceback" not in host.stderr()


def test_host_closing_the_room_ends_the_member(procs: list[RoomProc]) -> None:
    host, port = start_host(procs, "--no-mdns")
    member = start(procs, "join", CODE, "--peer", f"127.0.0.1:{port}")
    member.expect(r"^joined room 7")
    host.interrupt()
    member.expect(r"^left: the host closed the room")
    assert member.wait() == 0 and host.wait() == 0


def test_wrong_code_refused_on_both_sides(procs: list[RoomProc]) -> None:
    host, port = start_host(procs, "--no-mdns")
    joiner = start(procs, "join", "7-amber-fox", "--peer", f"127.0.0.1:{port}")
    assert joiner.wait(timeout=10) != 0
    err = joiner.stderr().strip().splitlines()
    assert err == ["peerpipe: error: the room code is wrong (or the host's is): check it and try again"]
    host.expect(r"^refused 127\.0\.0\.1:\d+: the room code is wrong")


def test_unknown_room_by_mdns_fails_clearly(procs: list[RoomProc]) -> None:
    joiner = start(procs, "join", "93-amber-falcon", "--listen", "127.0.0.1", "--timeout", "1.5")
    assert joiner.wait(timeout=10) == 1
    err = joiner.stderr()
    assert "no host for room 93" in err and "Traceback" not in err


def test_bad_code_format_is_one_line(procs: list[RoomProc]) -> None:
    joiner = start(procs, "join", "amber-falcon", "--peer", "127.0.0.1:9")
    assert joiner.wait(timeout=10) == 1
    assert joiner.stderr().strip().splitlines() == [
        "peerpipe: error: a room code starts with its room number (like 7-amber-falcon), not 'amber'"
    ]


def test_relay_sees_no_plaintext(procs: list[RoomProc]) -> None:
    host, port = start_host(procs, "--no-mdns")
    relay = Relay(("127.0.0.1", port))
    try:
        joiner = start(procs, "join", CODE, "--peer", relay.url, "--name", "canary-joiner-xyzzy")
        joiner.expect(r"^joined room 7")
        host.expect(r"^joined: canary-joiner-xyzzy")  # the name did reach the host...
        joiner.interrupt()
        host.expect(r"^left: canary-joiner-xyzzy .*said goodbye")
        wire = bytes(relay.upstream_bytes) + bytes(relay.downstream_bytes)
        assert len(relay.upstream_bytes) > HANDSHAKE_BYTES
        for secret in (b"canary-joiner-xyzzy", b"the-host", b"amber", b"falcon", b"hello", b"bye"):
            assert secret not in wire  # ...but never in the clear
    finally:
        relay.close()


def test_tampered_ciphertext_closes_the_connection(procs: list[RoomProc]) -> None:
    host, port = start_host(procs, "--no-mdns")
    relay = Relay(("127.0.0.1", port), flip_at=HANDSHAKE_BYTES + 12)  # inside the joiner's Hello record
    try:
        joiner = start(procs, "join", CODE, "--peer", relay.url)
        host.expect(r"^refused 127\.0\.0\.1:\d+: a record failed authentication")
        assert joiner.wait(timeout=10) != 0
        assert "Traceback" not in joiner.stderr()
    finally:
        relay.close()
    assert not any(re.match(r"^joined:", line) for line in host.seen)


def test_wired_into_the_peerpipe_command() -> None:
    import subprocess
    import sys

    from roomproc import REPO

    out = subprocess.run(
        [sys.executable, "-m", "peerpipe", "join", "7-amber", "--peer", "127.0.0.1:9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "peerpipe: error: a room code has a number and 2 to 6 words (like 7-amber-falcon), this one has 1 word(s)"
    ]
