"""``peerpipe host/join/status/plan/bench`` as real processes on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.room.roomproc import REPO, RoomProc

CODE = "3-amber-falcon"


def start(procs: list[RoomProc], *args: str) -> RoomProc:
    p = RoomProc(*args)
    procs.append(p)
    return p


def peerpipe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerpipe", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def open_room(procs: list[RoomProc], *extra: str) -> tuple[RoomProc, str]:
    host = start(procs, "host", "--listen", "127.0.0.1:0", "--code", CODE, "--no-mdns", "--name", "h", *extra)
    port = host.expect(r"^listening on 127\.0\.0\.1:(\d+)$").group(1)
    return host, f"127.0.0.1:{port}"


def join(procs: list[RoomProc], address: str, name: str) -> RoomProc:
    return start(procs, "join", CODE, "--peer", address, "--listen", "127.0.0.1", "--name", name)


def test_sigkill_drops_the_node_within_3_s_and_the_room_replans(procs, tiny_model_dir, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)
    host, address = open_room(procs, "--model", str(model), "--expect-nodes", "3", "--dtype", "float32")
    j1, j2 = join(procs, address, "j1"), join(procs, address, "j2")
    host.expect(r"^plan v1: ", timeout=30)
    status = json.loads(peerpipe("status", "--json").stdout)  # finds the room through its file
    assert sorted(n["name"] for n in status["nodes"]) == ["h", "j1", "j2"]
    assert status["plan"]["version"] == 1 and len(status["links"]) == 6
    assert all(n["heartbeat_age_ms"] < 3000 and n["health"] == "alive" for n in status["nodes"])
    table = peerpipe("status").stdout
    assert "TFLOPS" in table and "j1" in table and "plan v1 of" in table
    live = json.loads(peerpipe("plan", "--model", str(model), "--json", "--dtype", "float32").stdout)
    assert {s["node"] for s in live["stages"]} <= {"h", "j1", "j2"} and live["stages"][-1]["end"] == 4
    what_if = peerpipe("plan", "--model", str(model), "--add-to-room", "--node", "laptop:mem=16,tflops=2", "--json")
    assert "laptop" in {s["node"] for s in json.loads(what_if.stdout)["stages"]} | set(json.loads(what_if.stdout)["unused"])

    j2.proc.kill()
    killed = time.monotonic()
    host.expect(r"^left: j2 \(\w+\), lost", timeout=3)
    assert time.monotonic() - killed < 3.0
    host.expect(r"^plan v2: ", timeout=10)
    after = json.loads(peerpipe("status", "--json", "--code", CODE, "--peer", address).stdout)
    assert sorted(n["name"] for n in after["nodes"]) == ["h", "j1"]
    assert {s["node"] for s in after["plan"]["stages"]} <= {n["node_id"] for n in after["nodes"]}
    j1.interrupt()
    assert j1.wait() == 0
    host.expect(r"^left: j1 \(\w+\), said goodbye$")
    host.interrupt()
    assert host.wait() == 0
    assert "Traceback" not in host.stderr()


def test_frozen_node_is_suspected_then_dropped_then_joins_again(procs) -> None:
    host, address = open_room(procs, "--heartbeat", "0.2", "--suspect-after", "3", "--dead-after", "1.5")
    member = join(procs, address, "frozen")
    host.expect(r"^joined: frozen ")
    member.proc.send_signal(signal.SIGSTOP)  # the connection stays open: only heartbeats tell
    stopped = time.monotonic()
    host.expect(r"^suspected: frozen ", timeout=5)
    suspected = time.monotonic() - stopped
    host.expect(r"^dead: ", timeout=5)
    dead = time.monotonic() - stopped
    assert 0.4 < suspected < dead and 1.3 < dead < 3.5, (suspected, dead)
    member.proc.send_signal(signal.SIGCONT)
    host.expect(r"^joined: frozen ", timeout=5)  # it noticed it was dropped and joined again
    member.expect(r"dropped this node from the room; joining again")


def test_a_host_that_stood_still_keeps_its_members(procs) -> None:
    """A host stopped longer than --dead-after finds its members' beats unread when it wakes: it
    must not take its own silence for theirs and drop them all."""
    host, address = open_room(procs, "--heartbeat", "0.2", "--suspect-after", "3", "--dead-after", "1.5")
    join(procs, address, "m")
    host.expect(r"^joined: m ")
    host.proc.send_signal(signal.SIGSTOP)
    time.sleep(2.5)  # the freeze itself is what is tested: no event can come from a stopped host
    host.proc.send_signal(signal.SIGCONT)
    host.expect(r"^this host stood still for \d+\.\d s: members' silence counts from now$", timeout=5)
    view = json.loads(peerpipe("status", "--json", "--code", CODE, "--peer", address).stdout)
    assert [n["name"] for n in view["nodes"]] == ["h", "m"] and all(n["health"] == "alive" for n in view["nodes"])
    assert not any(line.startswith(("dead:", "suspected:")) for line in host.seen), host.seen


def test_plan_for_hypothetical_machines_prints_json(tiny_model_dir) -> None:
    model = tiny_model_dir("llama", config_overrides={"num_hidden_layers": 32})
    seed = ["--node", "a:mem=50,tflops=50", "--node", "b:mem=50,tflops=31", "--node", "c:mem=50,tflops=19"]
    out = peerpipe("plan", "--model", str(model), *seed, "--strategy", "proportional", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [(s["node"], s["start"], s["end"]) for s in plan["stages"]] == [("a", 0, 16), ("b", 16, 26), ("c", 26, 32)]
    assert plan["predicted_ms_per_token"] > 0
    optimal = json.loads(peerpipe("plan", "--model", str(model), *seed, "--json").stdout)
    assert optimal["predicted_ms_per_token"] <= plan["predicted_ms_per_token"]
    assert optimal["stages"][0]["start"] == 0 and optimal["stages"][-1]["end"] == 32


def test_plan_that_cannot_fit_exits_nonzero_with_the_reason(tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    out = peerpipe("plan", "--model", str(model), "--node", "tiny:mem=0.000001,tflops=1", "--context", "100000")
    assert out.returncode == 1 and out.stdout == ""
    assert "missing" in out.stderr and "KV cache" in out.stderr and "Traceback" not in out.stderr
    out = peerpipe("plan", "--model", str(model), "--node", "tiny:mem=0.000001,tflops=1", "--json")
    said = json.loads(out.stdout)  # a script reads why in the shape it reads a plan
    assert out.returncode == 1 and not said["fits"] and said["missing_bytes"] > 0 and "missing" in said["error"]
    assert json.loads(peerpipe("plan", "--model", str(model), "--node", "a:mem=8,tflops=1", "--json").stdout)["fits"]


@pytest.mark.parametrize(
    ("node", "needle"),
    [("nomem:tflops=1", "missing mem"), ("x:mem=1,tflops=1,speed=3", "unknown field"), ("x:mem=-1,tflops=1", "positive")],
)
def test_plan_rejects_bad_node_specs(tiny_model_dir, node: str, needle: str) -> None:
    out = peerpipe("plan", "--model", str(tiny_model_dir("llama")), "--node", node)
    assert out.returncode == 2 and needle in out.stderr


def test_status_without_a_room_says_what_to_pass(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "peerpipe", "status"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PEERPIPE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert out.returncode == 1 and "--code" in out.stderr


def test_bench_json_measures_and_then_reads_the_cache(tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    env = {"PEERPIPE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "peerpipe", "bench", "--model", str(model), "--quick", "--json", "--device", "cpu"]
    first = json.loads(subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=env, timeout=120).stdout)
    assert first["cached"] == []
    assert first["device"]["kind"] == "cpu" and first["device"]["cpu_cores"] >= 1
    bench = first["benchmark"]
    assert bench["tflops_1024"] > 0 and bench["tflops"] > 0 and bench["memory_gbps"] > 0 and bench["launch_ms"] > 0
    layer = first["layer"]
    assert 0 < layer["decode_ms"] < layer["prefill_ms"] and layer["layer_bytes"] > 0 and layer["layers"] == 4
    second = json.loads(subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=env, timeout=120).stdout)
    assert first["shared_memory_gbps"] > 0 and second["shared_memory_gbps"] == first["shared_memory_gbps"]
    assert len(second["cached"]) == 3 and second["layer"]["decode_ms"] == layer["decode_ms"]


def test_a_member_told_to_wait_rejoins_a_host_that_comes_back(procs) -> None:
    host, address = open_room(procs)
    member = start(procs, "join", CODE, "--peer", address, "--listen", "127.0.0.1", "--name", "m", "--wait-for-host")
    member.expect(r"^joined room 3: host h")
    host.expect(r"^joined: m ")
    host.proc.kill()
    member.expect(r"lost the host.*; waiting for a host of room 3", timeout=30)
    again = start(procs, "host", "--listen", address, "--code", CODE, "--no-mdns", "--name", "h2")
    again.expect(r"^joined: m ", timeout=30)
    member.expect(r"^joined room 3: host h2", timeout=10)
    member.interrupt()
    assert member.wait(timeout=15) == 0


def test_a_member_not_told_to_wait_exits_when_the_host_is_lost(procs) -> None:
    host, address = open_room(procs)
    member = join(procs, address, "m")
    host.expect(r"^joined: m ")
    host.proc.kill()
    assert member.wait(timeout=30) == 1
    assert "lost the host" in member.stderr()


def test_status_shows_every_stage_of_a_node_and_its_standbys(capsys: pytest.CaptureFixture[str]) -> None:
    """After standbys took over from lost nodes, one node may hold several stages; and a plan
    with --replicas keeps standbys, which status must show too."""
    from peerpipe import protocol as p
    from peerpipe.cli.cluster_cmds import print_status, view_to_json

    nodes = [p.NodeInfo(i, i, "cpu", 1 << 30, 1.0) for i in ("h", "m2", "m3")]
    stages = (p.PlanStage("h", 0, 2, 1.5), p.PlanStage("h", 2, 4), p.PlanStage("m2", 4, 6, 1.0))
    plan = p.Plan(5, "austen", 6, stages, 3.0, standbys=(p.PlanStage("m3", 4, 6),))
    view = p.RoomView(9, tuple(p.MemberState(n) for n in nodes), plan)
    data = view_to_json(view)
    layers = {n["name"]: (n["layers"], n["standby_layers"], n["predicted_ms_per_step"]) for n in data["nodes"]}
    assert layers == {"h": ([[0, 2], [2, 4]], [], 1.5), "m2": ([[4, 6]], [], 1.0), "m3": ([], [[4, 6]], None)}
    assert data["plan"]["standbys"] == [{"node": "m3", "start": 4, "end": 6}]

    print_status(data)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:5]}
    assert "[0,2) [2,4)" in rows["h"] and "+[4,6) spare" in rows["m3"]
