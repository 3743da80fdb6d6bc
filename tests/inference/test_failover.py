"""A room that survives its members: a host (in this process, so the test sees every token as it
comes) and members as real ``peerpipe join`` processes that the test kills, stops or starves.
Every answer that can be finished is finished, with the tokens of one undisturbed node."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.devtools.relay import Relay
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.entry import EntryConfig
from peerpipe.inference.errors import TaskFailedError
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


@pytest.fixture(scope="module")
def device(warm_bench: None) -> LocalDevice:
    return asyncio.run(LocalDevice.measure("cpu", quick=True))


@pytest.fixture
def model(tiny_model_dir, warm_layers) -> Path:
    path = tiny_model_dir("llama", config_overrides={"num_hidden_layers": 6})
    warm_layers(path)
    return path


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
) -> AsyncIterator[Failover]:
    """The proportional planner puts layers on every node (a stage to lose wherever the test
    wants one); ``layers_per_node`` caps what each may hold. With ``relays`` each member reaches
    the host through a relay the test can cut; without ``ready`` the room is yielded as soon as
    its members are started, before it plans."""
    lines: list[str] = []
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
            entry_config=EntryConfig(timeouts=Timeouts(prefill_s=30, stall_s=4, recover_s=60)),
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
                procs[f"m{i}"] = RoomProc(
                    "join", CODE, "--peer", peer, "--name", f"m{i}", "--model", folder, *common, prefix=SLOW
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


@pytest.mark.parametrize("victim", ["middle", "last"])
def test_a_stage_killed_mid_answer_is_replayed_with_the_same_tokens(model, device, victim: str) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(r: list[str]) -> None:
        async with failover_room(model, device, members=3) as f:
            r[:] = f.lines
            stages = f.stage_names()
            assert len(stages) >= 3 and stages[0] == "h", stages
            name = stages[1] if victim == "middle" else stages[-1]
            task = await f.answer_after(5, GREEDY)
            f.members[name].proc.kill()
            result = await task
            assert result.tokens == expected
            assert name not in f.stage_names()
            assert f.pipeline.recovery.failovers == 1 and f.pipeline.recovery.stalls == 1
            assert f.pipeline.recovery.replayed_tokens >= len(PROMPT) + 5
            assert any(line.startswith("recovering: stage " + name) for line in f.lines), f.lines

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_eight_streams_and_seeded_sampling_survive_a_kill(model, device) -> None:
    prompts = [[5 + i, 17, 42 + i, 99, 3] for i in range(7)]
    expected = [local_tokens(model, GREEDY, p) for p in prompts] + [local_tokens(model, SEEDED)]

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3) as f:
            lines[:] = f.lines
            name = f.stage_names()[-1]  # the sampler
            first = await f.answer_after(3, SEEDED)
            others = [asyncio.create_task(f.room.generate(p, temperature=0.0, max_tokens=40, ignore_eos=True)) for p in prompts]
            f.members[name].proc.kill()
            results = await asyncio.gather(*others, first)
            assert [r.tokens for r in results] == expected

    lines: list[str] = []
    arun(main(lines), lines)


def test_survivors_too_small_fail_the_answer_saying_so(model, device) -> None:
    async def main(lines: list[str]) -> None:
        # Each node holds two layers at most: the six layers and the embedding and head need all four.
        async with failover_room(model, device, members=3, layers_per_node=2, strategy="optimal") as f:
            lines[:] = f.lines
            assert len(f.stage_names()) == 4
            task = await f.answer_after(3, GREEDY)
            f.members[[n for n in f.stage_names() if n != "h"][-1]].proc.kill()
            with pytest.raises(TaskFailedError, match="the room cannot hold the model now: cannot plan"):
                await task

    lines: list[str] = []
    arun(main(lines), lines)


def test_a_member_with_no_layers_leaving_disturbs_nothing(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        # The optimal planner keeps hops few: every layer fits on two nodes, so two stay idle.
        async with failover_room(model, device, members=3, strategy="optimal") as f:
            lines[:] = f.lines
            idle = sorted(set(f.members) - set(f.stage_names()))
            assert idle, f.stage_names()
            before = f.pipeline.plan
            task = await f.answer_after(5, GREEDY)
            f.members[idle[0]].proc.kill()
            result = await task
            assert result.tokens == expected
            assert f.pipeline.recovery.failovers == 0
            assert f.pipeline.plan is not None and before is not None
            assert f.pipeline.plan.version > before.version  # planned again, the same stages

    lines: list[str] = []
    arun(main(lines), lines)


def test_a_member_without_the_model_is_planned_around(model, device, tmp_path) -> None:
    async def main(lines: list[str]) -> None:
        missing = str(tmp_path / "no-such-model")
        async with failover_room(model, device, members=3, member_model={0: missing}) as f:
            lines[:] = f.lines
            assert "m0" not in f.stage_names()
            assert f.room.cluster.rollout is not None and f.room.cluster.rollout.unable
            result = await f.room.generate(PROMPT, temperature=0.0, max_tokens=8, ignore_eos=True)
            assert len(result.tokens) == 8

    lines: list[str] = []
    arun(main(lines), lines)
    assert any("planning around m0" in line for line in lines), lines


@pytest.mark.slow
def test_a_stopped_stage_is_planned_around_and_the_answer_goes_on(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3) as f:
            lines[:] = f.lines
            name = f.stage_names()[1]
            task = await f.answer_after(5, GREEDY)
            f.members[name].proc.send_signal(signal.SIGSTOP)
            result = await task
            assert result.tokens == expected
            assert f.pipeline.recovery.failovers >= 1
            f.members[name].proc.send_signal(signal.SIGCONT)
            # Awake again, it beats and is a member once more.
            await f.room.cluster.wait_until(lambda h: any(m.info.name == name for m in h.view.alive()), 20)

    lines: list[str] = []
    arun(main(lines), lines)


def test_a_standby_takes_over_a_killed_stage_without_loading(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        # Four layers a node: the proportional plan uses a layer or two of each, so every node
        # has room for a standby copy of another's stage.
        async with failover_room(model, device, members=3, layers_per_node=4, replicas=1) as f:
            lines[:] = f.lines
            plan = f.pipeline.plan
            assert plan is not None and len(plan.standbys) == len(plan.stages)
            name = f.stage_names()[2]
            task = await f.answer_after(5, GREEDY)
            f.members[name].proc.kill()
            loads_before = sum("loading layers" in line for line in f.lines)
            result = await task
            assert result.tokens == expected
            assert any(line.startswith("failover: standbys take over from " + name) for line in f.lines), f.lines
            assert name not in f.stage_names()
            assert sum("loading layers" in line for line in f.lines) == loads_before  # the host loaded nothing
            assert f.pipeline.recovery.stalls == 1

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_a_kill_during_prefill_and_a_second_kill_after_the_first_failover(model, device) -> None:
    prompt = [(7 * i) % 500 + 3 for i in range(40)]
    expected = local_tokens(model, GREEDY, prompt)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, layers_per_node=4) as f:
            lines[:] = f.lines
            first, second = [n for n in f.stage_names() if n != "h"][:2]
            pieces: list[str] = []
            resumed = asyncio.Event()

            def on_text(piece: str) -> None:
                pieces.append(piece)
                if len(pieces) >= 3:
                    resumed.set()

            task = asyncio.create_task(
                f.room.generate(prompt, temperature=0.0, max_tokens=40, ignore_eos=True, on_text=on_text)
            )
            while not f.pipeline.active_tasks():  # the answer is admitted: its prompt is on its way
                await asyncio.sleep(0)
            f.members[first].proc.kill()  # members' writes take 20 ms: no token can be back yet
            assert not pieces
            await resumed.wait()  # it runs on the survivors
            f.members[second].proc.kill()
            result = await task
            assert result.tokens == expected
            assert f.pipeline.recovery.failovers == 2
            assert first not in f.stage_names() and second not in f.stage_names()

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_a_member_joining_mid_answer_is_planned_in_and_the_answer_goes_on(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=2) as f:
            lines[:] = f.lines
            task = await f.answer_after(3, GREEDY)
            f.start_member("m9")
            await f.room.cluster.wait_until(lambda h: any(m.info.name == "m9" for m in h.view.alive()), 30)
            result = await task
            assert result.tokens == expected

            def planned_in(h) -> bool:  # type: ignore[no-untyped-def]
                plan = h.rollout.plan
                return plan is not None and "m9" in {h.names().get(s.node_id) for s in plan.stages}

            await f.room.cluster.wait_until(planned_in, 30)  # the proportional planner gives every node layers
            await f.room.plan(60)
            assert "m9" in f.stage_names()

    lines: list[str] = []
    arun(main(lines), lines)


def test_a_member_with_a_corrupt_model_is_planned_around(model, device, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    for shard in broken.glob("*.safetensors"):
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, member_model={1: str(broken)}) as f:
            lines[:] = f.lines
            assert "m1" not in f.stage_names()
            result = await f.room.generate(PROMPT, temperature=0.0, max_tokens=8, ignore_eos=True)
            assert len(result.tokens) == 8

    lines: list[str] = []
    arun(main(lines), lines)
    assert any("m1 could not take its stage" in line for line in lines), lines


@pytest.mark.slow
def test_a_streaming_api_client_sees_no_error_across_a_failover(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3) as f:
            lines[:] = f.lines
            api = await f.room.serve_http(("127.0.0.1", 0))
            try:
                body = {"model": model.name, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                events: list[str] = []
                async with aiohttp.ClientSession() as http, http.post(f"{api.url}/v1/completions", json=body) as response:
                    assert response.status == 200
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 6:
                                f.members[f.stage_names()[-1]].proc.kill()
            finally:
                await api.close()
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert not any("error" in c for c in chunks)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
            assert text == engine.tokenizer.decode(expected)
            assert f.pipeline.recovery.failovers == 1

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_a_cut_link_is_planned_around_and_the_node_rejoins_when_it_heals(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, relays=True) as f:
            lines[:] = f.lines
            name = f.stage_names()[1]  # the host's link to it carries the hidden states
            task = await f.answer_after(5, GREEDY)
            f.cuts[name].cut()  # no FIN, no RST: only the silence tells
            result = await task
            assert result.tokens == expected
            assert name not in f.stage_names() and f.pipeline.recovery.failovers == 1
            assert any(line.startswith(("suspected: " + name, "stalled: " + name)) for line in f.lines), f.lines
            f.cuts[name].heal()
            await f.room.cluster.wait_until(lambda h: any(m.info.name == name for m in h.view.alive()), 30)

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_a_member_killed_while_the_plan_loads_is_planned_around(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, ready=False) as f:
            lines[:] = f.lines
            await f.room.cluster.wait_until(lambda h: h.rollout is not None and h.rollout.plan is not None, 60)
            planned = f.room.cluster.rollout.plan  # type: ignore[union-attr]
            names = f.room.cluster.names()
            victim = names[planned.stages[-1].node_id]
            f.members[victim].proc.kill()  # before or while it loads its layers
            result = await f.room.generate(PROMPT, temperature=0.0, max_tokens=40, ignore_eos=True, timeout_s=60)
            assert result.tokens == expected
            assert victim not in f.stage_names()

    lines: list[str] = []
    arun(main(lines), lines)
