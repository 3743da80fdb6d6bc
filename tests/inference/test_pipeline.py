"""Distributed inference in one process: a host and members over real loopback sockets, each
node loading its own stage from the model folder. Outputs must equal one node's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.local import LocalDevice
from peerpipe.cluster.membership import MembershipConfig
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.inference.entry import EntryConfig
from peerpipe.inference.errors import TaskFailedError
from peerpipe.inference.pipeline import Pipeline, Timeouts
from peerpipe.inference.runtime import StageRuntime
from peerpipe.inference.stage_server import StageServer
from peerpipe.plan import Budget, stage_memory
from peerpipe.protocol import ComputeRequest
from peerpipe.python_api import Node, create_room, join_room
from peerpipe.python_api import Room as PyRoom
from peerpipe.room import parse_code

T = TypeVar("T")
LINES: list[str] = []
CODE = parse_code("6-quiet-harbour")
FAST = MembershipConfig(heartbeat_s=0.5, suspect_after_beats=4, dead_after_s=5.0)
PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 8], [100, 200, 30, 40, 50, 60, 11], [1, 2]]


def arun(coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        LINES.clear()
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except BaseException:
            import sys
            print("\n".join(LINES), file=sys.stderr)
            raise

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def device(warm_bench: None) -> LocalDevice:
    return asyncio.run(LocalDevice.measure("cpu", quick=True))


@dataclasses.dataclass
class Room:
    host: PyRoom
    members: list[Node]

    @property
    def pipeline(self) -> Pipeline | None:
        assert self.host.inference is not None
        return self.host.inference.pipeline

    def servers(self) -> list[StageServer]:
        """Every stage server in the room, the host's included."""
        runtimes = [m.stage for m in self.members] + [self.host.cluster.stage]
        return [r.server for r in runtimes if isinstance(r, StageRuntime) and r.server is not None]


@contextlib.asynccontextmanager
async def room(
    model: Path, device: LocalDevice, members: int, *, layers_per_node: int | None, sessions: int = 8,
    draft: Path | None = None,
) -> AsyncIterator[Room]:
    choice = ModelChoice.from_dir(model, dtype="float32")
    budget = Budget(context_tokens=64, sessions=sessions)
    if layers_per_node is not None:
        # Enough memory for the embedding or head plus this many layers, not more.
        need = stage_memory(choice.spec, budget, 0, layers_per_node)
        device = dataclasses.replace(device, memory_limit_bytes=int(need / (1 - budget.headroom)) + 1)
    config = ClusterConfig(membership=FAST, replan_debounce_s=0.2, expect_nodes=members + 1, budget=budget)
    async with contextlib.AsyncExitStack() as stack:
        host = await stack.enter_async_context(
            create_room(
                model, code=str(CODE), name="host", dtype="float32", config=config, measured=device,
                entry_config=EntryConfig(timeouts=Timeouts(prefill_s=10, stall_s=10)), report=LINES.append,
                draft=draft,
            )
        )
        nodes = []
        for i in range(members):
            node = await stack.enter_async_context(
                join_room(
                    str(CODE), peer=host.address, model=model, name=f"m{i}", membership=FAST, measured=device,
                    report=lambda line, i=i: LINES.append(f"m{i}: {line}"),
                )
            )
            nodes.append(node)
        await host.plan(60)
        yield Room(host, nodes)


def local_tokens(model: Path, prompt: list[int], params: SamplingParams) -> list[int]:
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    return engine.generate(prompt, params).tokens


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_three_stages_give_the_tokens_of_one_node(arch: str, tiny_model_dir, device, warm_layers) -> None:
    model = tiny_model_dir(arch)
    warm_layers(model)
    expected = [local_tokens(model, p, GREEDY) for p in PROMPTS]
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    expected_seeded = local_tokens(model, PROMPTS[0], seeded)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None and len(pipeline.plan.stages) == 3 and not pipeline.local
            # One at a time, then all at once: batched decode must not change a token.
            alone = [await pipeline.generate(p, GREEDY) for p in PROMPTS]
            assert [a.tokens for a in alone] == expected
            together = await asyncio.gather(*(pipeline.generate(p, GREEDY) for p in PROMPTS * 2))
            assert [t.tokens for t in together] == expected * 2
            assert (await pipeline.generate(PROMPTS[0], seeded)).tokens == expected_seeded
            # Hidden states went stage to stage: every member's stage ran batched steps.
            servers = [m.stage.server for m in r.members if m.stage.server is not None]
            assert len(servers) >= 2 and all(s.stats.steps > 0 for s in servers)
            for server in servers:
                await server.wait_sessions(0, 5)  # every finished task freed its slot

    arun(main())



def test_a_long_prompt_goes_in_pipelined_chunks_and_changes_no_token(tiny_model_dir, device, warm_layers, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model_dir("llama")
    warm_layers(model)
    prompt = [(7 * i) % 300 + 3 for i in range(40)]
    # A repetition penalty reads the session's history: a chunk that drew a token would change it.
    penalised = SamplingParams(temperature=0.8, seed=9, repetition_penalty=1.3, max_tokens=12, ignore_eos=True)
    expected = [local_tokens(model, prompt, GREEDY), local_tokens(model, prompt, penalised)]
    seen: list[tuple[int, bool]] = []
    submit = StageServer.submit

    def spy(self: StageServer, message) -> None:  # type: ignore[no-untyped-def]
        if isinstance(message, ComputeRequest) and self.stage.is_first:
            seen.append((message.start_pos, message.partial))
        submit(self, message)

    monkeypatch.setattr(StageServer, "submit", spy)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None and len(pipeline.plan.stages) == 3
            pipeline.prefill_chunk = 8  # a 40-token prompt: 5 chunks
            got = [(await pipeline.generate(prompt, params)).tokens for params in (GREEDY, penalised)]
            assert got == expected

    arun(main())
    prefill = [(pos, partial) for pos, partial in seen if pos < 40]
    assert prefill[:5] == [(0, True), (8, True), (16, True), (24, True), (32, False)]


def test_cancel_mid_answer_frees_every_stage(tiny_model_dir, device, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None
            servers = r.servers()
            long = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
            started = asyncio.Event()

            def on_text(_: str) -> None:
                started.set()

            task = asyncio.create_task(pipeline.generate(PROMPTS[2], long, on_text, task_id="t-cancel"))
            await started.wait()
            assert all(len(s.sessions) == 1 for s in servers)
            assert pipeline.cancel("t-cancel")
            result = await task
            assert result.finish_reason == "cancelled" and 0 < len(result.tokens) < 50
            for server in servers:
                await server.wait_sessions(0, 5)
                assert server.cache.free_slots == server.cache.max_slots

    arun(main())


def test_a_cancel_between_steps_is_not_lost(tiny_model_dir, device, warm_layers) -> None:
    """Cancelled while no step is in flight (here: from the text callback, right after a token),
    the answer still stops at once instead of running to max_tokens."""
    model = tiny_model_dir("llama")
    warm_layers(model)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None
            long = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
            result = await pipeline.generate(
                PROMPTS[1], long, lambda _: pipeline.cancel("t-between"), task_id="t-between"
            )
            assert result.finish_reason == "cancelled" and len(result.tokens) <= 2

    arun(main())


def test_a_tokens_text_streams_while_the_next_step_computes(tiny_model_dir, device, warm_layers) -> None:
    """The host sends the step after a token before it makes and streams that token's text, so
    the text is off the token's path; a stop string found in it still ends the answer with one
    node's text and tokens (the step sent ahead is dropped, and every stage frees the session)."""
    model = tiny_model_dir("llama")
    warm_layers(model)
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    whole = engine.generate(PROMPTS[0], GREEDY)
    stop = next(whole.text[i : i + 3] for i in range(len(whole.text) // 2, len(whole.text)) if whole.text[i : i + 3].strip())
    stopped = dataclasses.replace(GREEDY, stop=(stop,))
    expected = engine.generate(PROMPTS[0], stopped)
    assert expected.finish_reason == "stop" and len(expected.tokens) < len(whole.tokens)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None
            ahead: list[int | None] = []
            on_text = lambda _: ahead.append(pipeline.step_in_flight("ahead"))  # noqa: E731
            result = await pipeline.generate(PROMPTS[0], GREEDY, on_text, task_id="ahead", speculate="off")
            assert result.tokens == whole.tokens and result.text == whole.text
            # Every piece of text but the answer's end went out with the next token's step in flight.
            assert len(ahead) >= 2 and all(p is not None for p in ahead[:-1]) and ahead[-1] is None
            result = await pipeline.generate(PROMPTS[0], stopped, task_id="stopped", speculate="off")
            assert (result.text, result.tokens, result.finish_reason) == (expected.text, expected.tokens, "stop")
            for server in r.servers():
                await server.wait_sessions(0, 5)

    arun(main())


def test_a_failing_stage_fails_the_task_with_its_reason(tiny_model_dir, device, warm_layers) -> None:
    model = tiny_model_dir("llama")
    warm_layers(model)

    async def main() -> None:
        async with room(model, device, members=2, layers_per_node=2) as r:
            pipeline = r.pipeline
            assert pipeline is not None
            middle = next(m for m in r.members if m.stage.server and m.stage.server.next_hop is not None)
            server = middle.stage.server
            assert server is not None

            def broken(module, args):  # the model itself raising, as a driver fault would
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            hook = server.stage.register_forward_pre_hook(broken)
            with pytest.raises(TaskFailedError, match=r"m\d layers \[\d+, \d+\): RuntimeError: CUDA error"):
                await pipeline.generate(PROMPTS[0], GREEDY)
            failed = [t for t in pipeline.tasks.values() if t.status.value == "failed"]
            assert len(failed) == 1 and "illegal memory access" in failed[0].error
            hook.remove()
            assert (await pipeline.generate(PROMPTS[0], GREEDY)).tokens  # the room still answers

    arun(main())


def test_a_room_of_one_runs_locally(tiny_model_dir, device, warm_layers, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """...and its stage takes each step before the host makes the last token's text: the
    stage's work is in this process, so a text made first would hold it back."""
    model = tiny_model_dir("llama")
    warm_layers(model)
    expected = local_tokens(model, PROMPTS[0], GREEDY)
    taken: list[int] = []  # positions of the steps the stage has started
    run = StageServer._run

    async def spy(self: StageServer, requests: list[ComputeRequest]) -> None:
        taken.append(requests[0].start_pos)
        await run(self, requests)

    monkeypatch.setattr(StageServer, "_run", spy)

    async def main() -> None:
        async with room(model, device, members=0, layers_per_node=None) as r:
            pipeline = r.pipeline
            assert pipeline is not None and pipeline.local
            # At each piece of text: the step in flight, and whether the stage had taken it.
            seen: list[tuple[int, bool]] = []

            def on_text(_: str) -> None:
                position = pipeline.step_in_flight("one")
                if position is not None:
                    seen.append((position, position in taken))

            assert (await pipeline.generate(PROMPTS[0], GREEDY, on_text, task_id="one", speculate="off")).tokens == expected
            assert len(seen) >= 2 and all(was_taken for _, was_taken in seen), seen

    arun(main())


@pytest.mark.parametrize(
    ("length", "stages", "chunk", "predicted_ms", "bounds"),
    [
        (600, 3, 128, 5.0, [0, 150, 300, 450, 600]),  # an explicit size: always, at least 128 each
        (600, 1, 128, 50.0, [0, 600]),  # one stage: nothing to overlap
        (200, 3, 128, 50.0, [0, 200]),  # shorter than two chunks
        (600, 3, 0, 50.0, [0, 600]),  # 0: whole
        (600, 3, None, 35.0, [0, 150, 300, 450, 600]),  # auto, a CPU-class room: chunks
        (600, 3, None, 4.0, [0, 600]),  # auto, a fast GPU room: whole
    ],
)
def test_prompts_are_cut_in_chunks_only_where_it_pays(length, stages, chunk, predicted_ms, bounds) -> None:  # type: ignore[no-untyped-def]
    from peerpipe.inference.prefill import prefill_bounds
    from peerpipe.protocol import Plan, PlanStage

    cuts = [0, 2, 4, 6][: stages + 1] if stages > 1 else [0, 6]
    plan = Plan(1, "m", 6, tuple(PlanStage(f"n{i}", a, b) for i, (a, b) in enumerate(itertools.pairwise(cuts))), predicted_ms)
    assert prefill_bounds(length, plan, chunk) == bounds


def test_a_trace_follows_each_step_through_every_stage(
    tiny_model_dir, device, warm_layers, tmp_path: Path, monkeypatch
) -> None:
    """With tracing on, every decode step of an answer is marked in order on its way: sent by the
    host (and handed to its socket), in, start, end and out on each of the three stages, and back
    as a token."""
    from peerpipe.inference import trace

    model = tiny_model_dir("llama")
    warm_layers(model)
    log = tmp_path / "trace.txt"
    monkeypatch.setattr(trace, "_file", log.open("a"))

    async def main() -> str:
        async with room(model, device, members=2, layers_per_node=2) as r:
            assert r.pipeline is not None and len(r.pipeline.plan.stages) == 3
            return (await r.pipeline.generate(PROMPTS[0], GREEDY, task_id="traced", speculate="off")).tokens and "traced"

    task = arun(main())
    trace.flush()
    steps: dict[int, list[tuple[int, str]]] = {}
    for line in log.read_text().splitlines():
        ns, event, task_id, position, _node = line.split()
        if task_id == task:
            steps.setdefault(int(position), []).append((int(ns), event))
    decode = [p for p in steps if p >= len(PROMPTS[0])]
    assert len(decode) == GREEDY.max_tokens - 1  # every token but the prompt's own took a step
    for position in decode:
        order = [event for _, event in sorted(steps[position])]
        # Handed to the socket after it was sent (the first stage may have it by then).
        assert order.count("sent") == 1 and order.index("sent") > order.index("send")
        order.remove("sent")
        # Inside a CPU stage's forward: its output ready (a GPU's adds "launched" and "run").
        forward = ["start", "ready", "end"]
        assert order[:-2] == ["send", *["in", *forward, "out"] * 2, "in", *forward]
        # A last stage on the host hands its token over before its send returns.
        assert sorted(order[-2:]) == ["out", "token"]


async def _alone_then_together(
    model: Path, device: LocalDevice, prompts: list[list[int]], *, copies: int, between: Callable[[], None]
) -> tuple[bool, bool]:
    """In a 3-stage room: each prompt answered alone, ``between()``, then ``copies`` of them all at
    once, which must give the same tokens. Returns whether the first and the last stage are not
    the host."""
    async with room(model, device, members=2, layers_per_node=2) as r:
        pipeline = r.pipeline
        assert pipeline is not None and len(pipeline.plan.stages) == 3
        alone = [(await pipeline.generate(p, GREEDY, speculate="off")).tokens for p in prompts]
        between()
        together = await asyncio.gather(*(pipeline.generate(p, GREEDY, speculate="off") for p in prompts * copies))
        assert [t.tokens for t in together] == alone * copies
        host = r.host.cluster.node.node_id
        return pipeline.stage_nodes[0] != host, pipeline.stage_nodes[-1] != host


def test_steps_of_one_forward_travel_as_one_compute_batch(tiny_model_dir, device, warm_layers, monkeypatch) -> None:
    """Answers running together: a stage sends the steps of one batched forward to the next node
    (and the last stage its tokens to the host) as one compute-batch, the host its answers' next
    steps too; tokens stay those of answers run alone."""
    from peerpipe.inference.dataplane import DataPlane
    from peerpipe.protocol import ComputeBatch

    model = tiny_model_dir("llama")
    warm_layers(model)
    sizes: list[tuple[int, int]] = []
    receive, coalesce = DataPlane._on_message, DataPlane._coalesced
    waited: list[str] = []  # decode steps the host held for the end of its loop's turn (prompts always wait)

    def spy(self: DataPlane, peer: str, message, tg) -> None:  # type: ignore[no-untyped-def]
        if isinstance(message, ComputeBatch):
            sizes.append((len(message.requests), len(message.results)))
        receive(self, peer, message, tg)

    async def held(self: DataPlane, node_id: str, request) -> None:  # type: ignore[no-untyped-def]
        if request.session is None and not request.partial:
            waited.append(request.task_id)
        await coalesce(self, node_id, request)

    monkeypatch.setattr(DataPlane, "_on_message", spy)
    monkeypatch.setattr(DataPlane, "_coalesced", held)

    def nothing_batched() -> None:
        assert not sizes  # one answer at a time: nothing to batch
        assert not waited  # and a lone answer's steps went at once

    first_is_remote, last_is_remote = arun(_alone_then_together(model, device, PROMPTS, copies=2, between=nothing_batched))
    assert any(requests > 1 for requests, _ in sizes), sizes  # stage to stage (and host to stage 1)
    assert bool(waited) == first_is_remote  # answers running together wait for each other's steps
    assert any(results > 1 for _, results in sizes) == last_is_remote, sizes  # last stage to the host


def test_prompts_of_one_length_share_a_forward(tiny_model_dir, device, warm_layers, monkeypatch) -> None:
    """Answers started together with prompts of one length prefill in one forward per stage, and
    get the tokens they get alone; a prompt of another length runs on its own."""
    model = tiny_model_dir("llama")
    warm_layers(model)
    prompts = [[5, 17, 42, 99, 3], [7, 7, 8, 9, 10], [100, 200, 30, 40, 50], [1, 2, 3, 4, 5], [9, 8, 7]]
    forwards: list[list[int]] = []  # the prompt lengths of each prompt forward
    run = StageServer._run

    async def spy(self: StageServer, requests: list[ComputeRequest]) -> None:
        if requests[0].start_pos == 0:
            forwards.append([self._new_positions(r) for r in requests])
        await run(self, requests)

    monkeypatch.setattr(StageServer, "_run", spy)

    def each_alone() -> None:
        assert all(len(f) == 1 for f in forwards)
        forwards.clear()

    arun(_alone_then_together(model, device, prompts, copies=1, between=each_alone))
    assert [5, 5, 5, 5] in forwards, forwards  # the four of length 5, at least on one stage
    assert all(3 not in f or f == [3] for f in forwards), forwards
