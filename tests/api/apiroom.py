"""A real room with its HTTP API, for the API and dashboard tests: a host process and members."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.room.roomproc import RoomProc


@dataclass
class ApiRoom:
    host: RoomProc
    url: str
    code: str
    members: list[RoomProc] = field(default_factory=list)

    def stop(self) -> None:
        for p in (self.host, *self.members):
            p.stop()


def open_api_room(
    model: Path,
    members: int,
    *,
    code: str,
    host_args: tuple[str, ...] = (),
    member_prefix: tuple[str, ...] = (),
    context: int = 64,
) -> ApiRoom:
    """Host (with members) serving ``model`` over the proportional plan, so every node holds layers."""
    host = RoomProc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", code, "--name", "h", "--model", str(model),
        "--dtype", "float32", "--expect-nodes", str(members + 1), "--context", str(context), "--device", "cpu",
        "--quick", "--strategy", "proportional", "--http", "127.0.0.1:0", *host_args,
    )
    room = ApiRoom(host, "", code)
    try:
        address = "127.0.0.1:" + host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1)
        room.url = host.expect(r"^dashboard: (http://\S+)/$", timeout=30).group(1)
        for i in range(members):
            room.members.append(
                RoomProc(
                    "join", code, "--peer", address, "--listen", "127.0.0.1", "--name", f"m{i}", "--model",
                    str(model), "--device", "cpu", "--quick", prefix=member_prefix,
                )
            )
        host.expect(r"^ready: ", timeout=90)
    except BaseException:
        room.stop()
        raise
    return room


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", **(headers or {})} if body is not None else (headers or {})
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_feed(url: str, condition: Callable[[dict[str, Any]], bool], timeout: float = 30.0, key: str = "") -> dict:
    """Read the dashboard's live feed until a snapshot satisfies ``condition``; return it."""
    feed = f"{url}/api/events" + (f"?key={key}" if key else "")
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    with urllib.request.urlopen(feed, timeout=timeout) as response:
        for raw in response:
            if time.monotonic() > deadline:
                raise AssertionError(f"the feed never satisfied the condition in {timeout} s; last: {last}")
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                snapshot = last = json.loads(line[6:])
                if condition(snapshot):
                    return snapshot
    raise AssertionError("the feed ended before the condition held")
