"""Helpers for tests that run ``peerpipe host`` / ``peerpipe join`` as real processes."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class RoomProc:
    """A CLI process whose stdout lines we can wait for (never sleep-and-hope)."""

    def __init__(
        self, *args: str, prefix: tuple[str, ...] = (), merge_stderr: bool = False, env: dict[str, str] | None = None
    ) -> None:
        """``merge_stderr``: ``expect`` sees stderr's lines too (and ``stderr()`` is empty)."""
        cmd = [*prefix, sys.executable, "-m", "peerpipe", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if m := regex.search(line):
                return m

    def unread(self) -> list[str]:
        """Lines not yet matched by ``expect``, all of them once the process has exited."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
        lines = []
        while not self.lines.empty():
            lines.append(self.lines.get_nowait())
        self.seen.extend(lines)
        return lines

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        if self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Relay:
    """A one-connection TCP relay on loopback that records both directions and can flip one byte."""

    def __init__(self, target: tuple[str, int], flip_at: int | None = None) -> None:
        self.target = target
        self.flip_at = flip_at
        self.upstream_bytes = bytearray()  # joiner -> host, as the joiner sent it
        self.downstream_bytes = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(self.target)
        self._sockets = [client, upstream]
        for src, dst, log, flip in (
            (client, upstream, self.upstream_bytes, self.flip_at),
            (upstream, client, self.downstream_bytes, None),
        ):
            t = threading.Thread(target=self._copy, args=(src, dst, log, flip), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket, log: bytearray, flip: int | None) -> None:
        try:
            while data := src.recv(65536):
                start = len(log)
                log += data
                if flip is not None and start <= flip < start + len(data):
                    buf = bytearray(data)
                    buf[flip - start] ^= 0x20
                    data = bytes(buf)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def url(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def close(self) -> None:
        self.server.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        for s in self._sockets:
            s.close()


class MdnsSniffer:
    """Counts peerpipe mDNS packets seen on any interface other than loopback (Linux, root).

    Passive: a packet socket only listens. Used to prove ``--listen 127.0.0.1`` keeps mDNS off
    this machine's real interfaces.
    """

    def __init__(self) -> None:
        self.leaks: list[str] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MdnsSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packet, (ifname, *_rest) = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if ifname != "lo" and b"_peerpipe" in packet:
                self.leaks.append(ifname)
