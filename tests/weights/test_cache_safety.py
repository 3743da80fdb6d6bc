"""The cache of fetched weights holds only checked bytes: when two processes of one machine fetch
into one copy at once, after a crash mid-fetch, and when a finished file changes on disk. The
fetches are real (``Fetcher``, ``Store``, ``WeightServer``); the holders sit in this process."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from peerpipe.weights import Manifest, Store, build_manifest
from peerpipe.weights.gguf_store import GGUFStore
from peerpipe.weights.local_copy import hash_range
from peerpipe.weights.stores import existing_store, open_store
from tests.weights.test_fetcher import MODEL, Room, _names


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return build_manifest(MODEL, "austen")


def _bad(store: Store | GGUFStore, names: list[str]) -> list[str]:
    """Tensors the store would hand the loader (or a peer) whose bytes are not the manifest's."""
    bad = []
    for name in names:
        at = store.locate(name)
        if at is None or hash_range(at.path, at.offset, store.manifest.tensor(name).nbytes) != store.manifest.tensor(name).sha256:
            bad.append(name)
    return bad


def _size(manifest: Manifest, names: list[str]) -> int:
    return sum(manifest.tensor(n).nbytes for n in names)


def test_two_processes_fetching_into_one_copy_take_turns_and_fetch_nothing_twice(manifest: Manifest, tmp_path: Path) -> None:
    first, second = _names(manifest, 1) + _names(manifest, 2), _names(manifest, 2) + _names(manifest, 3)
    rooms, heard = (Room(manifest), Room(manifest)), []
    rooms[1].fetcher.report = heard.append
    stores = (Store(manifest, tmp_path), Store(manifest, tmp_path))  # one cache, as two nodes of one machine

    async def main() -> None:
        for store in stores:
            store.open()
        one = asyncio.create_task(rooms[0].fetcher.fetch(stores[0], first, ["host"]))
        await asyncio.sleep(0)  # the first has the copy to itself
        await asyncio.gather(one, rooms[1].fetcher.fetch(stores[1], second, ["host"]))

    asyncio.run(main())
    assert any("waiting for it" in line for line in heard)
    assert rooms[0].fetcher.stats.bytes_received == _size(manifest, first)
    assert rooms[1].fetcher.stats.bytes_received == _size(manifest, _names(manifest, 3))  # layer 2 was there
    again = existing_store(manifest.id, tmp_path)
    assert again is not None and again.held_layers() == [1, 2, 3] and not _bad(again, first + second)


def test_a_finished_layer_that_changed_on_disk_is_not_held_and_only_its_bad_tensor_is_fetched_again(
    manifest: Manifest, tmp_path: Path
) -> None:
    names = _names(manifest, 4)
    store = Store(manifest, tmp_path)
    store.open()
    asyncio.run(Room(manifest).fetcher.fetch(store, names, ["host"]))
    touched = store.path("layer-00004")
    os.utime(touched, ns=(0, 0))  # the same bytes, a new mtime: hashed again, nothing fetched
    assert store.held_layers() == []
    room = Room(manifest)
    asyncio.run(room.fetcher.fetch(store, names, ["host"]))
    assert store.held_layers() == [4] and room.fetcher.stats.bytes_received == 0
    index = json.loads((store.root / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(index[n] == touched.name for n in names)  # the loader finds it again

    victim = names[-1]
    at = store.locate(victim)
    assert at is not None
    with at.path.open("r+b") as fh:  # bit rot in one tensor
        fh.seek(at.offset)
        fh.write(bytes(16))
    assert store.held_layers() == [] and store.locate(victim) is None
    room, heard = Room(manifest), []
    room.fetcher.report = heard.append
    asyncio.run(room.fetcher.fetch(store, names, ["host"]))
    assert any("changed on disk" in line and "1 of its tensors" in line for line in heard)
    assert room.fetcher.stats.bytes_received == manifest.tensor(victim).nbytes
    assert store.held_layers() == [4] and not _bad(store, names)
    index = json.loads((store.root / "model.safetensors.index.json").read_text())["weight_map"]
    assert index[victim] == touched.name


def test_the_verified_list_never_names_bytes_not_yet_on_the_disk(manifest: Manifest, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A resume after a crash trusts the list, so a tensor's bytes are synced before it is listed."""
    store = Store(manifest, tmp_path)
    store.open()
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("sync " + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    names = _names(manifest, 0)
    room = Room(manifest)
    asyncio.run(room.fetcher.fetch(store, names[:1], ["host"]))
    part = "peerpipe-layer-00000.safetensors.part"
    assert events.index("sync " + part) < next(i for i, e in enumerate(events) if ".verified.tmp" in e)
    assert json.loads((store.root / (part.removesuffix(".part") + ".verified")).read_text()) == names[:1]


def test_space_for_a_resumed_fetch_counts_what_its_part_still_lacks(manifest: Manifest, tmp_path: Path) -> None:
    names = _names(manifest, 3)
    store = Store(manifest, tmp_path)
    store.open()
    assert store.missing_bytes(names) == _size(manifest, names)
    asyncio.run(Room(manifest).fetcher.fetch(store, names[:1], ["host"]))
    assert (store.root / "peerpipe-layer-00003.safetensors.part").is_file()  # sparse, mostly holes
    assert store.missing_bytes(names) == _size(manifest, names[1:])


def test_a_gguf_copy_changed_since_its_last_fetch_has_its_tensors_hashed_again(tiny_model_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peerpipe.devtools.tiny_gguf import write_gguf

    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny_model_dir("llama", config_overrides={"num_hidden_layers": 2}), gguf, linear="Q8_0", embed="Q8_0")
    manifest = build_manifest(gguf, "tiny")
    names = sorted(t.name for t in manifest.tensors if t.name.startswith("blk.1."))
    store = open_store(manifest, tmp_path / "cache")
    assert isinstance(store, GGUFStore)
    store.open()
    asyncio.run(Room(manifest, model=gguf).fetcher.fetch(store, names, ["host"]))
    assert store.held_layers() == [1] and not _bad(store, names)
    at = store.locate(names[0])
    assert at is not None
    with at.path.open("r+b") as fh:  # written after the fetch ended (a crash mid-write, an edit)
        fh.seek(at.offset)
        fh.write(b"\xff" * 8)
    room, heard = Room(manifest, model=gguf), []
    room.fetcher.report = heard.append
    asyncio.run(room.fetcher.fetch(store, names, ["host"]))
    assert any("changed on disk" in line for line in heard)
    assert room.fetcher.stats.bytes_received == manifest.tensor(names[0]).nbytes
    assert not _bad(store, names)


def test_a_copy_fetched_whole_is_the_same_copy_when_a_node_hosts_it(manifest: Manifest, tmp_path: Path) -> None:
    """Its own bookkeeping (``peerpipe-manifest.json``, lists, stamps) is not part of the model:
    shared with members, it would overwrite their store's manifest."""
    store = Store(manifest, tmp_path)
    store.open()
    room = Room(manifest)
    asyncio.run(room.fetcher.fetch_files(store, ["host"]))
    asyncio.run(room.fetcher.fetch(store, [t.name for t in manifest.tensors], ["host"]))
    again = build_manifest(store.root, "austen")
    assert again.id == manifest.id and not any(f.name.startswith("peerpipe-") for f in again.files)


def test_a_copy_fetched_before_stamps_were_kept_is_held_as_it_was(manifest: Manifest, tmp_path: Path) -> None:
    names = _names(manifest, 2)
    store = Store(manifest, tmp_path)
    store.open()
    asyncio.run(Room(manifest).fetcher.fetch(store, names, ["host"]))
    for kept in store.root.glob("*.stamp"):
        kept.unlink()  # as an older peerpipe left it
    assert store.held_layers() == [2] and store.missing_bytes(names) == 0
    room = Room(manifest)
    asyncio.run(room.fetcher.fetch(store, names, ["host"]))
    assert room.fetcher.stats.bytes_received == 0 and not _bad(store, names)


def test_a_finished_file_cut_short_is_fetched_again_whole(manifest: Manifest, tmp_path: Path) -> None:
    names = _names(manifest, 5)
    store = Store(manifest, tmp_path)
    store.open()
    asyncio.run(Room(manifest).fetcher.fetch(store, names, ["host"]))
    final = store.path("layer-00005")
    with final.open("r+b") as fh:  # a restore that stopped half way
        fh.truncate(final.stat().st_size // 2)
    assert store.held_layers() == []
    room, heard = Room(manifest), []
    room.fetcher.report = heard.append
    asyncio.run(room.fetcher.fetch(store, names, ["host"]))
    assert any("its length or header" in line for line in heard)
    assert room.fetcher.stats.bytes_received == _size(manifest, names)
    assert store.held_layers() == [5] and not _bad(store, names)
