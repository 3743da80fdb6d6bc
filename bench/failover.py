"""What losing a member costs a running answer, side by side in one run (CPU, loopback).

    python bench/failover.py                    # 75M deep-narrow shape, 4 nodes, 20 random kills
    python bench/failover.py --kills 100 --shape tiny

A host in this process and three members as real `peerpipe join` processes, each allowed memory
for a share of the layers, so the plan uses every node. Rows:

* stall after SIGKILL of a middle stage, without and with standbys (`--replicas 1`): the last
  token before the kill to the first token after it, as the answer's caller sees it;
* detection: SIGKILL (the connection drops), SIGSTOP (heartbeats stop) and a cut link (a relay
  between the host and the member stops passing bytes, no FIN, no RST): from the fault to the
  host pausing the answers on that stage;
* random kills: each round starts 8 concurrent greedy answers, kills a random member stage after a
  random number of tokens, starts a replacement member, and checks every answer against the local
  engine. Goal: 100% complete and equal; stall <= 1 s with a standby.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import SHAPES  # noqa: E402

from peerpipe.cluster.config import ClusterConfig  # noqa: E402
from peerpipe.cluster.local import LocalDevice  # noqa: E402
from peerpipe.cluster.membership import MembershipConfig  # noqa: E402
from peerpipe.cluster.model_choice import ModelChoice  # noqa: E402
from peerpipe.compute import set_threads  # noqa: E402
from peerpipe.devtools.relay import Relay  # noqa: E402
from peerpipe.devtools.tiny_model import tiny_config, write_random_model  # noqa: E402
from peerpipe.engine.generate import LocalEngine  # noqa: E402
from peerpipe.engine.sampling import SamplingParams  # noqa: E402
from peerpipe.inference.entry import EntryConfig  # noqa: E402
from peerpipe.inference.pipeline import Timeouts  # noqa: E402
from peerpipe.plan import Budget, stage_memory  # noqa: E402
from peerpipe.python_api import Room, create_room  # noqa: E402
from tests.room.roomproc import RoomProc  # noqa: E402

CODE = "8-bench-failover"
CONTEXT, SESSIONS, NEW = 256, 8, 48
HEARTBEAT = MembershipConfig(heartbeat_s=0.5, suspect_after_beats=3, dead_after_s=30.0)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Bench:
    room: Room
    members: dict[str, RoomProc]
    lines: list[tuple[float, str]]  # the host's report, stamped
    join_args: list[str]

    @property
    def plan_names(self) -> list[str]:
        assert self.room.inference is not None
        pipeline = self.room.inference.pipeline
        assert pipeline.plan is not None
        return [pipeline.names[s.node_id] for s in pipeline.plan.stages]

    def start_member(self, name: str, peer: str) -> None:
        self.members[name] = RoomProc("join", CODE, "--peer", peer, "--name", name, *self.join_args)

    def when(self, pattern: str, after: int) -> float | None:
        """When the host first reported a line containing ``pattern`` after line ``after``."""
        for at, line in self.lines[after:]:
            if pattern in line:
                return at
        return None


@contextlib.asynccontextmanager
async def bench_room(model: Path, device: LocalDevice, *, members: int, replicas: int, relays: bool = False):  # type: ignore[no-untyped-def]
    """A room of this host and ``members`` member processes; with ``relays``, each member reaches
    the host through a relay the bench can cut."""
    spec = ModelChoice.from_dir(model, dtype="float32").spec
    budget = Budget(CONTEXT, SESSIONS)
    share = -(-spec.num_layers // (members + 1))
    # Room for what the survivors' shares grow to when one node is lost and, with standbys,
    # another's share as well; never for the whole model on one node.
    survivors_share = -(-spec.num_layers // members) + 1
    layers = max(survivors_share, 2 * share + 1) if replicas else survivors_share
    offer = int(stage_memory(spec, budget, 0, layers) / 0.9) + 1
    lines: list[tuple[float, str]] = []
    config = ClusterConfig(
        membership=HEARTBEAT, replan_debounce_s=0.3, expect_nodes=members + 1, budget=budget,
        strategy="proportional", replicas=replicas,
    )
    limited = dataclasses.replace(device, memory_limit_bytes=offer)
    cuts: dict[str, Relay] = {}
    procs: dict[str, RoomProc] = {}
    try:
        async with create_room(
            model, code=CODE, name="h", dtype="float32", config=config, measured=limited,
            report=lambda line: lines.append((time.monotonic(), line)),
            entry_config=EntryConfig(timeouts=Timeouts(prefill_s=60, stall_s=30, recover_s=120)),
        ) as room:
            address = f"{room.address[0]}:{room.address[1]}"
            # One thread a node: four processes share this machine's cores, and OpenMP pools that
            # spin against each other slow every node down by orders of magnitude.
            join_args = ["--listen", "127.0.0.1", "--model", str(model), "--device", "cpu", "--quick",
                         "--memory", f"{offer / 1e9:.9f}", "--threads", "1"]
            bench = Bench(room, procs, lines, join_args)
            for i in range(members):
                name = f"m{i}"
                peer = address
                if relays:
                    cuts[name] = Relay(room.address)
                    host, port = await cuts[name].start()
                    peer = f"{host}:{port}"
                bench.start_member(name, peer)
            await room.plan(300)
            yield bench, cuts, address
    finally:
        for relay in cuts.values():
            await relay.close()
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.proc.send_signal(signal.SIGCONT)
            proc.stop()


async def timed_answer(room: Room, prompt: list[int], stamps: list[float], started: asyncio.Event, after: int):  # type: ignore[no-untyped-def]
    """One greedy answer; ``stamps`` gets each token's arrival time (read off the answer's task every
    millisecond: text pieces are not tokens), ``started`` is set at the ``after``-th token."""
    assert room.inference is not None
    pipeline = room.inference.pipeline
    task_id = uuid.uuid4().hex
    answer = asyncio.create_task(
        room.inference.pipeline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True), task_id=task_id)
    )
    while not answer.done():
        task = pipeline.tasks.get(task_id)
        while task is not None and len(stamps) < len(task.tokens):
            stamps.append(time.monotonic())
        if len(stamps) >= after:
            started.set()
        await asyncio.sleep(0.001)
    return await answer


async def until_started(task: asyncio.Task, started: asyncio.Event) -> None:  # type: ignore[type-arg]
    """Wait for the answer's first tokens; an answer that ended first has failed the bench."""
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()  # raises what went wrong
        raise RuntimeError("the answer ended before the fault")


async def one_fault(model: Path, device: LocalDevice, fault: str, replicas: int, expected: list[int]) -> dict:
    async with bench_room(model, device, members=3, replicas=replicas, relays=fault == "cut") as (b, cuts, _):
        # The stage after the host's: the host's link to it carries the hidden states.
        victim = b.plan_names[1]
        assert b.plan_names[0] == "h" and victim != "h", b.plan_names
        stamps: list[float] = []
        started = asyncio.Event()
        task = asyncio.create_task(timed_answer(b.room, PROMPT, stamps, started, 8))
        await until_started(task, started)
        mark = len(b.lines)
        fault_at = time.monotonic()
        if fault == "kill":
            b.members[victim].proc.kill()
        elif fault == "stop":
            b.members[victim].proc.send_signal(signal.SIGSTOP)
        else:
            cuts[victim].cut()
        result = await task
        detected = b.when("recovering:", mark) or b.when("failover:", mark)
        before = max(t for t in stamps if t <= fault_at)
        after = min(t for t in stamps if t > fault_at)
        return {
            "fault": fault,
            "replicas": replicas,
            "equal": result.tokens == expected,
            "stall_s": round(after - before, 3),
            "detect_s": round(detected - fault_at, 3) if detected else None,
            "promoted": b.when("failover: standbys take over", mark) is not None,
        }


async def random_kills(model: Path, device: LocalDevice, kills: int, replicas: int, expected: dict) -> dict:
    rng = random.Random(7)
    done = equal = 0
    stalls: list[float] = []
    async with bench_room(model, device, members=3, replicas=replicas) as (b, _, address):
        spare = 3
        for round_ in range(kills):
            prompts = list(expected)
            stamps: list[list[float]] = [[] for _ in prompts]
            started = asyncio.Event()
            tasks = [
                asyncio.create_task(timed_answer(b.room, list(p), s, started if i == 0 else asyncio.Event(), rng.randint(1, NEW // 2)))
                for i, (p, s) in enumerate(zip(prompts, stamps, strict=True))
            ]
            await until_started(tasks[0], started)
            victims = [n for n in b.plan_names if n != "h"]
            victim = rng.choice(victims)
            fault_at = time.monotonic()
            b.members.pop(victim).proc.kill()
            name = f"m{spare}"
            spare += 1
            b.start_member(name, address)  # the room stays four nodes strong
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for prompt, result, ts in zip(prompts, results, stamps, strict=True):
                ok = not isinstance(result, BaseException)
                done += ok
                equal += ok and result.tokens == expected[prompt]  # type: ignore[union-attr]
                late = [t for t in ts if t > fault_at]
                early = [t for t in ts if t <= fault_at]
                if late and early:
                    stalls.append(min(late) - max(early))
            await b.room.cluster.wait_until(lambda h, n=name: any(m.info.name == n for m in h.view.alive()), 60)
            await b.room.plan(120)
            log(f"kill {round_ + 1}/{kills}: {victim}; {done}/{8 * (round_ + 1)} answers complete, {equal} equal")
    answers = 8 * kills
    return {
        "kills": kills,
        "replicas": replicas,
        "answers": answers,
        "complete_pct": round(100 * done / answers, 2),
        "equal_pct": round(100 * equal / answers, 2),
        "stall_median_s": round(statistics.median(stalls), 3) if stalls else None,
        "stall_max_s": round(max(stalls), 3) if stalls else None,
    }


PROMPT = list(range(5, 37))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-75m")
    parser.add_argument("--kills", type=int, default=20, help="random kills under 8 streams (the goal names 100)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="peerpipe-failover-"))
    model = root / args.shape
    write_random_model(model, tiny_config("llama", **SHAPES[args.shape]), seed=0, dtype="float32")
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    expected = engine.generate(PROMPT, greedy).tokens
    prompts = {tuple(range(5 + i, 37 + i)): None for i in range(8)}
    streams = {p: engine.generate(list(p), greedy).tokens for p in prompts}
    del engine
    device = asyncio.run(LocalDevice.measure("cpu", quick=True))
    set_threads(1)  # the host's share, as each member's
    rows = []
    for fault, replicas in (("kill", 0), ("kill", 1), ("stop", 0), ("cut", 0)):
        log(f"{fault}, replicas {replicas}")
        rows.append(asyncio.run(one_fault(model, device, fault, replicas, expected)))
    kills = [asyncio.run(random_kills(model, device, args.kills, replicas, streams)) for replicas in (1,)] if args.kills else []
    print(f"{'fault':8} {'standby':>8} {'detect s':>9} {'stall s':>8} {'equal':>6}")
    for r in rows:
        print(f"{r['fault']:8} {('yes' if r['replicas'] else 'no'):>8} {r['detect_s']!s:>9} {r['stall_s']:>8} {r['equal']!s:>6}")
    for k in kills:
        print(
            f"random kills: {k['kills']} under 8 streams (standby {'yes' if k['replicas'] else 'no'}): "
            f"{k['complete_pct']}% complete, {k['equal_pct']}% equal, stall median {k['stall_median_s']} s, "
            f"max {k['stall_max_s']} s"
        )
    print(json.dumps({"bench": "failover", "shape": args.shape, "faults": rows, "random_kills": kills}))


if __name__ == "__main__":
    main()
