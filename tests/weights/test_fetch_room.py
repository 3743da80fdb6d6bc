"""Rooms whose members hold none (or an older copy) of the model: they fetch exactly their layers
from peers over the room's encrypted connections, check every tensor, keep them for next time,
and the answers stay the local engine's."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import pytest

from peerpipe.cluster.config import ClusterConfig
from peerpipe.cluster.local import LocalDevice
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.models import default_model_dir
from peerpipe.plan import Budget
from peerpipe.python_api import create_room, join_room
from peerpipe.weights import build_manifest
from peerpipe.weights.local_copy import locations as folder_locations
from peerpipe.weights.stores import existing_store

MODEL = default_model_dir()
PROMPT = [5, 17, 42, 99, 3, 250, 11]
TOKENS = 12


@pytest.fixture(scope="module")
def device(warm_bench: None) -> LocalDevice:
    return asyncio.run(LocalDevice.measure("cpu", quick=True))


@pytest.fixture(scope="module")
def expected() -> list[int]:
    engine, _ = LocalEngine.from_dir(MODEL, device="cpu", dtype="float32", max_seq=128)
    return engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)).tokens


async def room_of(stack: contextlib.AsyncExitStack, device: LocalDevice, members: list[dict], report=None):  # type: ignore[no-untyped-def]
    config = ClusterConfig(
        expect_nodes=1 + len(members), strategy="proportional", budget=Budget(128, 2), replan_debounce_s=0.2
    )
    room = await stack.enter_async_context(
        create_room(MODEL, dtype="float32", config=config, measured=device, speculate="off", report=report)
    )
    nodes = [
        await stack.enter_async_context(join_room(str(room.code), peer=room.address, measured=device, name=f"m{i}", **kw))
        for i, kw in enumerate(members)
    ]
    return room, nodes


async def answer(room) -> list[int]:  # type: ignore[no-untyped-def]
    return (await room.generate(PROMPT, temperature=0.0, max_tokens=TOKENS, ignore_eos=True)).tokens


def served(plan, node) -> set[int]:  # type: ignore[no-untyped-def]
    return {i for s in plan.stages if s.node_id == node.stage.node_id for i in range(s.start, s.end)}


def test_members_with_no_model_fetch_their_layers_and_answer_as_one_machine(device, expected, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = build_manifest(MODEL, "austen")

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            room, nodes = await room_of(stack, device, [{"weights_dir": tmp_path / "a"}, {"weights_dir": tmp_path / "b"}])
            plan = await room.plan(60)
            assert len(plan.stages) == 3
            assert await answer(room) == expected
            for node, folder in zip(nodes, ("a", "b"), strict=True):
                store = existing_store(manifest.id, tmp_path / folder)
                assert store is not None and set(store.held_layers()) == served(plan, node)  # its layers, no others
                stats = node.stage.weights.fetcher.stats
                assert stats.bytes_received > 0 and stats.bad_tensors == 0

    asyncio.run(asyncio.wait_for(main(), 120))

    async def again() -> None:  # the same member, the same room's copy: everything is on disk already
        async with contextlib.AsyncExitStack() as stack:
            room, nodes = await room_of(stack, device, [{"weights_dir": tmp_path / "a"}, {"weights_dir": tmp_path / "b"}])
            await room.plan(60)
            assert await answer(room) == expected
            assert [n.stage.weights.fetcher.stats.bytes_received for n in nodes] == [0, 0]

    asyncio.run(asyncio.wait_for(again(), 120))


def test_a_member_with_a_stale_copy_fetches_only_the_tensors_that_differ(device, expected, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stale = tmp_path / "stale"
    shutil.copytree(MODEL, stale)
    changed = "model.layers.4.mlp.down_proj.weight"
    at = folder_locations(stale)[changed]
    with (stale / at.path.name).open("r+b") as fh:  # an older copy: one matrix differs
        fh.seek(at.offset + 100)
        fh.write(b"\x01\x02\x03\x04")

    said: list[str] = []

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            room, (node,) = await room_of(stack, device, [{"model": stale, "weights_dir": tmp_path / "cache", "report": said.append}])
            plan = await room.plan(60)
            assert 4 in served(plan, node)
            assert await answer(room) == expected
            stats = node.stage.weights.fetcher.stats
            files = sum(f.nbytes for f in build_manifest(MODEL, "austen").files)  # config, tokenizer: always fetched
            assert stats.bytes_received - files == at.nbytes  # the one matrix; the rest came from its own disk
            assert stats.copied_locally > 0
            # The user hears that their --model is not the room's, once.
            assert [line for line in said if "is not the room's model" in line] == [
                f"--model stale is not the room's model ({room.cluster.rollout.model.manifest_id[:12]}): this node serves the room's, "
                "fetched from its peers (any tensor the two share is copied from yours)"
            ]

    asyncio.run(asyncio.wait_for(main(), 120))


def test_wrong_bytes_from_a_peer_are_caught_and_fetched_from_another_holder(device, expected, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            monkeypatch.setenv("PEERPIPE_TEST_CORRUPT_WEIGHTS", "1")  # the host (made now) sends bad bytes
            config = ClusterConfig(expect_nodes=3, strategy="proportional", budget=Budget(128, 2), replan_debounce_s=0.2)
            room = await stack.enter_async_context(
                create_room(MODEL, dtype="float32", config=config, measured=device, speculate="off")
            )
            monkeypatch.delenv("PEERPIPE_TEST_CORRUPT_WEIGHTS")
            await stack.enter_async_context(join_room(str(room.code), peer=room.address, measured=device, model=MODEL, name="full"))
            empty = await stack.enter_async_context(
                join_room(str(room.code), peer=room.address, measured=device, weights_dir=tmp_path, name="empty")
            )
            await room.plan(60)
            assert await answer(room) == expected
            stats = empty.stage.weights.fetcher.stats
            assert stats.bad_tensors > 0  # the host's pieces were refused...
            assert empty.stage.weights.fetcher.stats.bytes_received > 0  # ...and good ones came from "full"

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_node_joining_fetches_its_layers_while_the_current_plan_keeps_answering(device, expected, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from peerpipe.weights import transfer as fetch_module

    monkeypatch.setattr(fetch_module, "PIECE", 4096)  # a slow fetch: thousands of round trips, one at a time
    monkeypatch.setattr(fetch_module, "WINDOW", 1)
    fetching, switched = asyncio.Event(), asyncio.Event()

    def report(line: str) -> None:
        if "of layers first" in line:
            fetching.set()
        elif fetching.is_set() and "acknowledged by every stage" in line:
            switched.set()

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            config = ClusterConfig(expect_nodes=2, strategy="proportional", budget=Budget(128, 2), replan_debounce_s=0.2)
            room = await stack.enter_async_context(
                create_room(MODEL, dtype="float32", config=config, measured=device, speculate="off", report=report)
            )
            await stack.enter_async_context(join_room(str(room.code), peer=room.address, measured=device, model=MODEL, name="m0"))
            first = await room.plan(60)
            late = await stack.enter_async_context(
                join_room(str(room.code), peer=room.address, measured=device, weights_dir=tmp_path, name="late")
            )
            await asyncio.wait_for(fetching.wait(), 30)
            # The new plan waits for the late node's layers; the current one answers meanwhile.
            assert await answer(room) == expected
            assert room.inference.pipeline.plan.version == first.version and room.inference.ready
            assert late.stage.weights.fetcher.stats.bytes_received < sum(t.nbytes for t in build_manifest(MODEL, "x").tensors)
            await asyncio.wait_for(switched.wait(), 120)
            plan = await room.plan(60)
            assert plan.version > first.version and late.stage.node_id in {s.node_id for s in plan.stages}
            assert await answer(room) == expected

    asyncio.run(asyncio.wait_for(main(), 180))


def test_a_node_stopped_mid_fetch_resumes_where_it_stopped(device, expected, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from peerpipe.weights import transfer

    monkeypatch.setattr(transfer, "PIECE", 2048)  # thousands of round trips: slow enough to stop it halfway
    monkeypatch.setattr(transfer, "FIRST_PIECE", 2048)
    monkeypatch.setattr(transfer, "WINDOW", 1)
    total = sum(t.nbytes for t in build_manifest(MODEL, "austen").tensors)
    progressed, serving = asyncio.Event(), asyncio.Event()

    def report(line: str) -> None:
        if line.startswith("fetching layers") and "100%" not in line:
            progressed.set()

    def host_report(line: str) -> None:
        if line.startswith("ready: ") and "e2[" in line:
            serving.set()

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            room, _ = await room_of(stack, device, [{"model": MODEL}], report=host_report)
            await room.plan(60)
            async with contextlib.AsyncExitStack() as first:
                node = await first.enter_async_context(join_room(
                    str(room.code), peer=room.address, measured=device, weights_dir=tmp_path, name="e", report=report
                ))
                await asyncio.wait_for(progressed.wait(), 60)
                before = node.stage.weights.fetcher.stats.bytes_received
            assert 0 < before
            manifest_id = room.cluster.rollout.model.manifest_id
            kept = existing_store(manifest_id, tmp_path)
            assert kept is not None
            verified = sum(kept.manifest.tensor(n).nbytes for g in kept.groups for n in kept.verified(g))
            assert verified > 0  # checked tensors survive the stop
            again = await stack.enter_async_context(
                join_room(str(room.code), peer=room.address, measured=device, weights_dir=tmp_path, name="e2")
            )
            await asyncio.wait_for(serving.wait(), 60)
            assert await answer(room) == expected
            got = again.stage.weights.fetcher.stats.bytes_received
            assert got <= total - verified + 300_000  # what was verified is not fetched again (files aside)

    asyncio.run(asyncio.wait_for(main(), 180))


def test_a_room_runs_the_gguf_only_its_host_has(device, tiny_model_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A room of laptops can run the model one of them has in Ollama: its members fetch their
    layers' quantized blocks and the header into a sparse copy of the file."""
    from peerpipe.devtools.tiny_gguf import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny_model_dir("llama", config_overrides={"num_hidden_layers": 6}), gguf, linear="Q8_0", embed="Q8_0")
    engine, _ = LocalEngine.from_dir(gguf, device="cpu", dtype="float32", max_seq=128)
    want = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)).tokens
    manifest = build_manifest(gguf, "tiny")
    assert manifest.gguf is not None and all(t.dtype.startswith("GGML") for t in manifest.tensors)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            config = ClusterConfig(expect_nodes=3, strategy="proportional", budget=Budget(128, 2), replan_debounce_s=0.2)
            room = await stack.enter_async_context(
                create_room(gguf, dtype="float32", config=config, measured=device, speculate="off")
            )
            nodes = [
                await stack.enter_async_context(join_room(
                    str(room.code), peer=room.address, measured=device, name=f"m{i}", weights_dir=tmp_path / f"c{i}"
                ))
                for i in range(2)
            ]
            plan = await room.plan(60)
            assert len(plan.stages) == 3
            assert (await answer(room)) == want
            for i, node in enumerate(nodes):
                store = existing_store(manifest.id, tmp_path / f"c{i}")
                assert store is not None and set(store.held_layers()) == served(plan, node)
                copy = store.load_path
                assert copy.stat().st_size == gguf.stat().st_size  # as long as the original...
                assert copy.stat().st_blocks * 512 < gguf.stat().st_size  # ...but only its share is on disk

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_member_that_cannot_keep_fetched_layers_is_planned_around(device, expected, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "cache").write_text("a file where its cache folder should be")
    lines: list[str] = []

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            room, (_, bad) = await room_of(
                stack, device, [{"model": MODEL}, {"weights_dir": tmp_path / "cache"}], report=lines.append
            )
            plan = await room.plan(60)
            assert bad.stage.node_id not in {s.node_id for s in plan.stages}
            assert bad.stage.node_id in room.cluster.rollout.unable
            assert await answer(room) == expected

    asyncio.run(asyncio.wait_for(main(), 120))
    assert any("could not take its stage" in line and "cannot write fetched weights" in line for line in lines), lines
