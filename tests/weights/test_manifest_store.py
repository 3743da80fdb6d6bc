"""Manifests (a sha256 per tensor) and the store of fetched layers: what a peer sends is checked
before anything is parsed further, and only verified groups become loadable files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from peerpipe.engine.config import ModelConfig
from peerpipe.engine.loader import checkpoint_index, load_stage
from peerpipe.engine.safetensors_io import read_tensors
from peerpipe.models import default_model_dir
from peerpipe.weights import DiskSpaceError, Manifest, ManifestError, Store, build_manifest, copy_manifest
from peerpipe.weights.local_copy import locations as folder_locations
from peerpipe.weights.stores import existing_store

MODEL = default_model_dir()


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return build_manifest(MODEL, "austen")


def test_the_manifest_names_every_tensor_and_small_file_and_round_trips(manifest: Manifest) -> None:
    names = {t.name for t in manifest.tensors}
    assert names == set(checkpoint_index(MODEL))
    assert {"config.json", "tokenizer.json"} <= {f.name for f in manifest.files}
    again = Manifest.from_json(manifest.to_json(), manifest.id)
    assert again == manifest and again.id == manifest.id
    assert copy_manifest(MODEL, "austen").id == manifest.id  # cached: the same copy, the same id


def _edited(manifest: Manifest, edit) -> bytes:  # type: ignore[no-untyped-def]
    body = json.loads(manifest.to_json())
    edit(body)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda b: b["files"][0].update(name="../../etc/passwd"), "unsafe file name"),
        (lambda b: b["files"][0].update(name="/abs.json"), "unsafe file name"),
        (lambda b: b["files"][0].update(name="sub/config.json"), "unsafe file name"),
        (lambda b: b["tensors"][0].update(dtype="Q4"), "unknown dtype"),
        (lambda b: b["tensors"][0].update(bytes=b["tensors"][0]["bytes"] + 1), "is not"),
        (lambda b: b["tensors"][0].update(sha256="zz"), "sha256"),
        (lambda b: b["tensors"].append(dict(b["tensors"][0])), "twice"),
        (lambda b: b.update(format=99), "format"),
    ],
)
def test_a_bad_manifest_is_refused_with_the_reason(manifest: Manifest, edit, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ManifestError, match=why):
        Manifest.from_json(_edited(manifest, edit))


def test_a_manifest_that_does_not_hash_to_the_rooms_id_is_refused(manifest: Manifest) -> None:
    other = _edited(manifest, lambda b: b["tensors"][0].update(sha256="0" * 64))
    with pytest.raises(ManifestError, match="hashes to"):
        Manifest.from_json(other, manifest.id)


def test_fuzzed_manifests_raise_only_manifest_errors(manifest: Manifest) -> None:
    raw = manifest.to_json()
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            Manifest.from_json(bytes(data), manifest.id)
        except ManifestError:
            continue
        raise AssertionError("a changed manifest hashed to the same id")


def _fill(store: Store, names: list[str]) -> None:
    where = folder_locations(MODEL)
    for name in names:
        at = where[name]
        with at.path.open("rb") as fh:
            fh.seek(at.offset)
            store.write(name, 0, fh.read(at.nbytes))
        assert store.check(name)


def test_a_stage_loads_from_the_verified_groups_it_fetched(manifest: Manifest, tmp_path: Path) -> None:
    store = Store(manifest, tmp_path)
    store.open()
    for f in manifest.files:
        store.put_file(f.name, (MODEL / f.name).read_bytes())
    layer = [t.name for t in manifest.tensors if t.name.startswith("model.layers.2.")]
    _fill(store, layer)
    store.close()
    assert store.held_layers() == [2]
    assert not list(store.root.glob("*.part"))  # the group is complete: renamed, and in the index
    cfg = ModelConfig.from_dir(store.root)
    stage, _ = load_stage(store.root, 2, 3, device="cpu", dtype="float32", cfg=cfg)
    reference, _ = load_stage(MODEL, 2, 3, device="cpu", dtype="float32", cfg=cfg)
    for (name, a), (_, b) in zip(stage.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_bytes_never_complete_a_group_and_verified_tensors_survive_a_restart(manifest: Manifest, tmp_path: Path) -> None:
    store = Store(manifest, tmp_path)
    store.open()
    layer = sorted(t.name for t in manifest.tensors if t.name.startswith("model.layers.0."))
    _fill(store, layer[:2])
    record = manifest.tensor(layer[2])
    store.write(record.name, 0, bytes(record.nbytes))  # zeros: not the tensor
    assert not store.check(record.name)
    store.close()
    assert store.held_layers() == [] and not store.complete(record.group)
    again = existing_store(manifest.id, tmp_path)  # a new process: only the two checked ones count
    assert again is not None and again.verified(record.group) == set(layer[:2])
    assert again.locate(layer[0]) is not None and again.locate(record.name) is None
    _fill(again, layer[2:])
    again.close()
    assert again.held_layers() == [0]
    entries = checkpoint_index(again.root)
    tensors, _ = read_tensors([entries[layer[0]]])
    where = folder_locations(MODEL)[layer[0]]
    with where.path.open("rb") as fh:
        fh.seek(where.offset)
        assert tensors[layer[0]].view(-1).view(torch.uint8).numpy().tobytes() == fh.read(where.nbytes)


def test_a_disk_without_room_is_a_clear_error_before_any_byte_is_written(manifest: Manifest, tmp_path: Path) -> None:
    store = Store(manifest, tmp_path)
    names = [t.name for t in manifest.tensors]
    free = shutil.disk_usage(tmp_path).free
    huge = Manifest(manifest.model_id, manifest.files, tuple(
        type(t)(t.name, "U8", (free,), free, t.sha256) if i == 0 else t for i, t in enumerate(manifest.tensors)
    ))
    Store(manifest, tmp_path).check_space(names)  # the real one fits
    with pytest.raises(DiskSpaceError, match="free"):
        Store(huge, tmp_path).check_space(names)
    assert not any(store.root.glob("*.safetensors*"))


def test_fetched_layers_are_listed_by_peerpipe_models_and_rm_frees_them(manifest: Manifest) -> None:
    from peerpipe.models.catalog import catalog, remove

    store = Store(manifest)  # the default place: the cache
    store.open()
    _fill(store, [t.name for t in manifest.tensors if t.name.startswith("model.layers.5.")])
    store.close()
    name = f"fetched:austen@{manifest.id[:12]}"
    held = next(h for h in catalog() if h.name == name)
    assert held.source == "fetched" and held.path == store.root and held.bytes > 0
    remove(name)
    assert not store.root.exists() and all(h.name != name for h in catalog())


def test_a_manifest_that_does_not_match_its_config_is_refused_before_any_tensor_is_fetched(manifest: Manifest, tmp_path: Path) -> None:
    import asyncio

    from peerpipe.weights import NodeWeights

    lacking = Manifest(manifest.model_id, manifest.files, tuple(t for t in manifest.tensors if "layers.3." not in t.name))
    store = Store(lacking, tmp_path)
    store.open()
    for f in manifest.files:
        store.put_file(f.name, (MODEL / f.name).read_bytes())

    async def never(_peer: str, _message: object) -> None:
        raise AssertionError("nothing may be fetched for a manifest that does not match its config")

    weights = NodeWeights(never, None, cache=tmp_path)
    with pytest.raises(ManifestError, match="does not match its config"):
        asyncio.run(weights.prepare(lacking.id, [(0, 6)], ["host"], "layers [0, 6)"))
