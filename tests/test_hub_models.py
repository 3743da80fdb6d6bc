"""Models by Hugging Face id, resolved offline from a Hub cache the test fills in the Hub's own
layout (``models--org--name/refs/main`` naming a snapshot folder), as a user's machine has it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peerpipe.cli.main import main
from peerpipe.cluster.model_choice import ModelChoice
from peerpipe.models import ModelNotFoundError, resolve_model

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / COMMIT


def test_an_id_resolves_to_its_snapshot_and_is_named_after_the_model(hub: Path) -> None:
    assert resolve_model("acme/tiny-llama") == hub
    assert resolve_model(f"acme/tiny-llama@{COMMIT}") == hub
    assert ModelChoice.from_dir(resolve_model("acme/tiny-llama"), "float32").model_id == "tiny-llama"


def test_an_id_not_in_the_cache_says_so_offline(hub: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        resolve_model("acme/other-model")
    with pytest.raises(ModelNotFoundError, match=r"acme/tiny-llama is in the Hugging Face cache, but not its revision 'nope'"):
        resolve_model("acme/tiny-llama@nope")


def test_generate_takes_an_id(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", "acme/tiny-llama", "--max-tokens", "3", "--ignore-eos", "--json", "hi"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 3
