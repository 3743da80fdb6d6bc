"""``peerpipe models``: what this machine holds, from every place a model can come from, and
``models rm`` frees a cache entry without touching what is the user's or Ollama's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peerpipe.cli.main import main


@pytest.fixture
def stores(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("PEERPIPE_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_model_dir("llama"), hub / "snapshots" / ("a" * 40))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ollama = tmp_path / "ollama"
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / ("sha256-" + "b" * 64)).write_bytes(b"GGUF" + bytes(1000))
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "llama3.2" / "1b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "b" * 64}]}))
    pulled = ollama / "manifests" / "hf.co" / "bartowski" / "smol-gguf" / "Q4_1"  # (from another registry)
    latest = ollama / "manifests" / "registry.ollama.ai" / "library" / "smol" / "latest"
    for more in (pulled, latest):
        more.parent.mkdir(parents=True)
        more.write_text(manifest.read_text())
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    own = tmp_path / "mine"
    shutil.copytree(tiny_model_dir("qwen2"), own)
    return {"hub": hub, "own": own}


def listed(capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert main(["models", "--json"]) == 0
    return {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}


def test_models_lists_every_source_and_rm_frees_only_caches(stores: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(stores["own"]), "--max-tokens", "2", "--json", "hi"]) == 0  # used once
    capsys.readouterr()
    models = listed(capsys)
    assert models["austen"]["source"] == "bundled"
    assert models["acme/tiny"]["source"] == "hub" and models["acme/tiny"]["bytes"] > 0
    assert models["ollama:llama3.2:1b"]["source"] == "ollama" and models["ollama:llama3.2:1b"]["bytes"] == 1004
    from peerpipe.models import resolve_model

    held = models["ollama:hf.co/bartowski/smol-gguf:Q4_1"]  # listed under the name --model takes
    assert held["source"] == "ollama" and resolve_model("ollama:hf.co/bartowski/smol-gguf:Q4_1") == Path(held["path"])
    assert models[str(stores["own"].resolve())]["source"] == "local"
    # A path that is no model fails, and is not listed as one.
    from peerpipe.models.catalog import remember

    sparse = stores["own"].parent / "sparse.gguf"  # as a fetched GGUF: only the layers held take disk
    with sparse.open("wb") as f:
        f.write(b"GGUF")
        f.truncate(50 << 20)
    remember(sparse)
    assert listed(capsys)[str(sparse.resolve())]["bytes"] < 1 << 20
    for notes in (stores["own"].parent / "notes.txt", stores["own"].parent / "notes.gguf"):
        notes.write_text("hello")
        assert main(["generate", "--model", str(notes), "--max-tokens", "2", "hi"]) == 1
        capsys.readouterr()
        assert str(notes.resolve()) not in listed(capsys)

    assert main(["models", "rm", "acme/tiny"]) == 0
    assert not stores["hub"].exists()
    assert main(["models", "rm", str(stores["own"].resolve())]) == 0
    assert stores["own"].is_dir()  # forgotten, not deleted: the folder is the user's
    assert main(["models", "rm", "ollama:llama3.2:1b"]) == 1
    assert "ollama rm" in capsys.readouterr().err
    assert main(["models", "rm", "ollama:smol"]) == 1  # found as :latest, as --model finds it, and left to Ollama
    assert "ollama rm" in capsys.readouterr().err
    assert set(listed(capsys)) >= {"austen", "ollama:llama3.2:1b"} and "acme/tiny" not in listed(capsys)


def test_fetched_layers_are_listed_as_such(stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cache" / "models" / ("c" * 64)
    folder.mkdir(parents=True)
    (folder / "peerpipe-manifest.json").write_text(json.dumps({"model_id": "austen"}))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"fetched:austen@{'c' * 12}" in out and "`peerpipe models rm NAME` frees them" in out
