"""A room as a new user meets it while it starts: ``generate --room`` waits for a room still
planning (and says so), ``status -v`` works, and ``plan`` on a CPU room plans the dtype the host
really loads."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.room.roomproc import REPO, RoomProc

CODE = "4-amber-falcon"


def peerpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerpipe", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_generate_waits_for_a_room_that_is_still_planning(procs, tiny_model_dir, warm_layers) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model_dir("llama")
    warm_layers(model)
    host = RoomProc(
        "host", "--listen", "127.0.0.1:0", "--no-mdns", "--code", CODE, "--model", str(model), "--quick",
        "--expect-nodes", "2", "--context", "64", "--device", "cpu",
    )
    procs.append(host)
    address = "127.0.0.1:" + host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1)
    host.expect(r"^waiting for nodes: 1 of 2")

    # The room has no plan (it waits for a second node): the client waits, saying so.
    client = RoomProc(
        "generate", "--room", CODE, "--peer", address, "--max-tokens", "5", "--ignore-eos", "--json", "--timeout", "60",
        "hello", merge_stderr=True,
    )
    procs.append(client)
    client.expect(r"^waiting for the room to be ready \(the room has no plan yet\), up to 60 s$", timeout=30)
    member = RoomProc("join", CODE, "--peer", address, "--listen", "127.0.0.1", "--model", str(model), "--quick", "--device", "cpu")
    procs.append(member)
    answer = json.loads(client.expect(r"^(\{.*\})$", timeout=60).group(1))
    assert len(answer["tokens"]) == 5 and answer["finish_reason"] == "length"
    assert client.wait(timeout=10) == 0

    # -v after the command's name, as the README says every command takes it.
    status = peerpipe("status", "-v", "--code", CODE, "--peer", address)
    assert status.returncode == 0, status.stderr
    assert "ms/step pred / meas" in status.stdout and "measured" in status.stdout, status.stdout
    view = json.loads(peerpipe("status", "--json", "--code", CODE, "--peer", address).stdout)
    stages = [n for n in view["nodes"] if n["layers"]]
    assert stages and all(n["predicted_ms_per_step"] > 0 for n in stages)
    assert all(n["measured_ms_per_step"] > 0 for n in stages)  # the answer ran decode steps on each
    assert view["plan"]["measured_ms_per_token"] > 0
    assert view["plan"]["lanes"] == 1  # CPU nodes of one machine take turns on its cores

    # A CPU host loads float32, and plan says so instead of bfloat16.
    plan = peerpipe("plan", "--model", str(model), "--code", CODE, "--peer", address)
    assert plan.returncode == 0, plan.stderr
    assert "of float32 weights" in plan.stdout, plan.stdout


def test_bench_prints_each_measurement_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = peerpipe("bench", "--quick")
    assert out.returncode == 0, out.stderr
    names = [line.split("  ")[0] for line in out.stdout.splitlines()]
    assert names.count("matmul fp32 1024") == 1, out.stdout
