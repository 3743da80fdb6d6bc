"""A room for failover tests: a host in the test's process (so the test sees every token as it comes)
and members as real ``peerpipe join`` processes that the test kills, stops, starves or cuts off."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.devtools.relay import Relay
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.entry import EntryConfig
from peerpipe.inference.pipeline import Pipeline, Timeouts
from peerpipe.plan import Budget, stage_memory
from peerpipe.python_api import Room, create_room
from tests.room.roomproc import RoomProc

T = TypeVar("T")
CODE = "3-amber-falcon"
CONTEXT, SESSIONS = 96, 8
FAST = MembershipConfig(heartbeat_s=0.5, suspect_after_beats=4, dead_after_s=30.0)
PROMPT = [5, 17, 42, 99, 3, 8]
SLOW = ("env", "PEERPIPE_LINK_DELAY_MS=20")  # members' writes: answers last seconds, not milliseconds


def arun(coro: Coroutine[Any, Any, T], lines: list[str], timeout: float = 150.0) -> T:
    async def bounded() -> T:
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except BaseException:
            import sys

            print("\n".join(lines), file=sys.stderr)
            raise

    return asyncio.run(bounded())


def offer(model: Path, layers: int) -> int:
    """Bytes a node may offer so that it holds at most ``layers`` layers (plus embedding or head)."""
    spec = ModelChoice.from_dir(model, dtype="float32").spec
    return int(stage_memory(spec, Budget(CONTEXT, SESSIONS), 0, layers) / 0.9) + 1


def local_tokens(model: Path, params: SamplingParams, prompt: list[int] = PROMPT) -> list[int]:
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
    return engine.generate(prompt, params).tokens


@dataclasses.dataclass
class Failover:
    room: Room
    members: dict[str, RoomProc]
    lines: list[str]
    address: str
    join_args: list[str]
    cuts: dict[str, Relay]

    @property
    def pipeline(self) -> Pipeline:
        assert self.room.inference is not None
        return self.room.inference.pipeline

    def start_member(self, name: str) -> None:
        """Another member joins, as the room's first ones did."""
        self.members[name] = RoomProc("join", CODE, "--peer", self.address, *self.join_args, "--name", name, prefix=SLOW)

    def stage_names(self) -> list[str]:
        plan = self.pipeline.plan
        assert plan is not None
        return [self.pipeline.names[s.node_id] for s in plan.stages]

    async def answer_after(self, tokens: int, params: SamplingParams, prompt: list[int] = PROMPT):  # type: ignore[no-untyped-def]
        """Start an answer; return its task once ``tokens`` of it have streamed."""
        seen = asyncio.Event()
        count = 0

        def on_text(_: str) -> None:
            nonlocal count
            count += 1
            if count >= tokens:
                seen.set()

        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "stop_token_ids"}
        task = asyncio.create_task(self.room.generate(prompt, on_text=on_text, **fields))
        waiting = asyncio.create_task(seen.wait())
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert not task.done(), "the answer ended before it could be disturbed"
        return task


@contextlib.asynccontextmanager
async def failover_room(
    model: Path,
    device: LocalDevice,
    *,
    members: int,
    layers_per_node: int = 3,
    strategy: str = "proportional",
    replicas: int = 0,
    member_model: dict[int, str] | None = None,
    relays: bool = False,
    ready: bool = True,
    lines: list[str] | None = None,
    rejoin_s: float = 30.0,
) -> AsyncIterator[Failover]:
    """The proportional planner puts layers on every node (a stage to lose wherever the test
    wants one); ``layers_per_node`` caps what each may hold. With ``relays`` each member reaches
    the host through a relay the test can cut; without ``ready`` the room is yielded as soon as
    its members are started, before it plans. The host reports into ``lines`` (the test's own list,
    which ``arun`` prints when the test fails)."""
    lines = [] if lines is None else lines
    cuts: dict[str, Relay] = {}
    budget = Budget(context_tokens=CONTEXT, sessions=SESSIONS)
    config = ClusterConfig(
        membership=FAST, replan_debounce_s=0.3, expect_nodes=members + 1, budget=budget, strategy=strategy,
        replicas=replicas,
    )
    limited = dataclasses.replace(device, memory_limit_bytes=offer(model, layers_per_node))
    memory = f"{offer(model, layers_per_node) / 1e9:.9f}"
    procs: dict[str, RoomProc] = {}
    try:
        async with create_room(
            model, code=CODE, name="h", dtype="float32", config=config, measured=limited, report=lines.append,
            entry_config=EntryConfig(timeouts=Timeouts(prefill_s=30, stall_s=4, recover_s=60, rejoin_s=rejoin_s)),
        ) as room:
            address = f"{room.address[0]}:{room.address[1]}"
            common = ["--listen", "127.0.0.1", "--device", "cpu", "--quick", "--memory", memory]
            for i in range(members):
                folder = (member_model or {}).get(i, str(model))
                peer = address
                if relays:
                    cuts[f"m{i}"] = Relay(room.address)
                    host, port = await cuts[f"m{i}"].start()
                    peer = f"{host}:{port}"
                with_model = ["--model", folder] if folder else []  # "": joins with no model at all
                procs[f"m{i}"] = RoomProc(
                    "join", CODE, "--peer", peer, "--name", f"m{i}", *with_model, *common, prefix=SLOW
                )
            if ready:
                await room.plan(90)
            yield Failover(room, procs, lines, address, [*common, "--model", str(model)], cuts)
    finally:
        for relay in cuts.values():
            await relay.close()
        for proc in procs.values():
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGCONT)
            proc.stop()


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=40, ignore_eos=True)
