"""A room that survives losing its members: stages killed, stopped or cut off mid-answer. Every answer
that can be finished is finished, with the tokens of one undisturbed node."""

from __future__ import annotations

import asyncio
import signal

import pytest

from peerpipe.inference.errors import TaskFailedError
from tests.inference.failover_room import GREEDY, PROMPT, SEEDED, arun, failover_room, local_tokens


@pytest.mark.parametrize("victim", ["middle", "last"])
def test_a_stage_killed_mid_answer_is_replayed_with_the_same_tokens(model, device, victim: str) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, lines=lines) as f:
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
        async with failover_room(model, device, members=3, lines=lines) as f:
            name = f.stage_names()[-1]  # the sampler
            first = await f.answer_after(3, SEEDED)
            others = [asyncio.create_task(f.room.generate(p, temperature=0.0, max_tokens=40, ignore_eos=True)) for p in prompts]
            f.members[name].proc.kill()
            results = await asyncio.gather(*others, first)
            assert [r.tokens for r in results] == expected

    lines: list[str] = []
    arun(main(lines), lines)


def test_survivors_too_small_fail_the_answer_saying_so_once_no_node_came_back(model, device) -> None:
    async def main(lines: list[str]) -> None:
        # Each node holds two layers at most: the six layers and the embedding and head need all four.
        async with failover_room(
            model, device, members=3, layers_per_node=2, strategy="optimal", lines=lines, rejoin_s=1.0
        ) as f:
            assert len(f.stage_names()) == 4
            task = await f.answer_after(3, GREEDY)
            f.members[[n for n in f.stage_names() if n != "h"][-1]].proc.kill()
            with pytest.raises(TaskFailedError, match="the room cannot hold the model now: cannot plan"):
                await task

    lines: list[str] = []
    arun(main(lines), lines)


def test_an_answer_waits_for_a_node_to_take_the_place_of_one_the_room_could_not_do_without(model, device) -> None:
    """A tab reloading, a laptop waking: the answer under way goes on with the tokens of one node."""
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, layers_per_node=2, strategy="optimal", lines=lines) as f:
            task = await f.answer_after(3, GREEDY)
            f.members[[n for n in f.stage_names() if n != "h"][-1]].proc.kill()
            f.start_member("late")
            result = await task
            assert result.tokens == expected and "late" in f.stage_names()
            assert any("cannot plan" in line for line in f.lines), f.lines  # it did wait on its way

    lines: list[str] = []
    arun(main(lines), lines)


@pytest.mark.slow
def test_a_stopped_stage_is_planned_around_and_the_answer_goes_on(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, lines=lines) as f:
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
        async with failover_room(model, device, members=3, layers_per_node=4, replicas=1, lines=lines) as f:
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
        async with failover_room(model, device, members=3, layers_per_node=4, lines=lines) as f:
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
def test_a_cut_link_is_planned_around_and_the_node_rejoins_when_it_heals(model, device) -> None:
    expected = local_tokens(model, GREEDY)

    async def main(lines: list[str]) -> None:
        async with failover_room(model, device, members=3, relays=True, lines=lines) as f:
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
        async with failover_room(model, device, members=3, ready=False, lines=lines) as f:
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
