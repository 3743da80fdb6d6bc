"""``peerpipe demo`` on a fresh machine: a room of three local nodes with the bundled model answers
in bounded time, then serves the API and the dashboard until Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from peerpipe.models import default_model_dir
from tests.api.apiroom import http
from tests.room.roomproc import RoomProc


def test_demo_answers_then_serves_until_ctrl_c(tmp_path: Path) -> None:
    # A fresh cache: nothing measured, nothing written before.
    os.environ["PEERPIPE_CACHE"], saved = str(tmp_path), os.environ["PEERPIPE_CACHE"]
    try:
        demo = RoomProc("demo", "--http", "127.0.0.1:0", "--max-tokens", "30")
    finally:
        os.environ["PEERPIPE_CACHE"] = saved
    try:
        code = demo.expect(r"^room code: (\d+-[a-z]+-[a-z]+) ", timeout=60).group(1)
        demo.expect(r"^joined: demo-node-1 ")
        demo.expect(r"^joined: demo-node-2 ")
        plan = demo.expect(r"^plan v\d+: (.*), [0-9.]+ ms/token predicted$", timeout=120).group(1)
        assert plan.count("->") == 2, plan  # three stages
        url = demo.expect(r"^dashboard: (http://127\.0\.0\.1:\d+)/$").group(1)
        answer = demo.expect(r"^answer: (.*)$", timeout=60).group(1)
        stats = demo.expect(r"^\[(\d+) tokens at [0-9.]+ tok/s through 3 stages").group(1)
        assert 1 <= int(stats) <= 30
        words = re.findall(r"[A-Za-z]+", answer)
        assert len(words) >= 3, answer
        demo.expect(r"^serving the API and the dashboard")

        status, _, body = http("GET", url + "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [default_model_dir().name]
        status, _, body = http("GET", url + "/api/room")
        room = json.loads(body)
        assert room["code"] == code and len(room["nodes"]) == 3 and room["ready"]
        # `peerpipe status`, with no code, finds the demo's room as it finds a host's.
        out = subprocess.run(
            [sys.executable, "-m", "peerpipe", "status", "--json"], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PEERPIPE_CACHE": str(tmp_path)}, check=True,
        ).stdout
        assert sorted(n["name"] for n in json.loads(out)["nodes"]) == ["demo-host", "demo-node-1", "demo-node-2"]

        demo.interrupt()
        assert demo.wait(timeout=30) == 0
        assert "Traceback" not in demo.stderr()
    finally:
        demo.stop()
