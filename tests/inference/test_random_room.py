"""A random folder (engine/random_weights.py: config, tokenizer, a seed, no weights) is a model a
room can plan and serve: each stage draws its own layers, and because every tensor's draw depends
only on the seed and its name, the room answers exactly as one node of the same folder."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peerpipe.devtools.tiny_model import tiny_config, write_random_model
from peerpipe.engine.errors import ModelLoadError
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.loader import check_model_dir, load_stage
from peerpipe.engine.random_weights import MARKER
from peerpipe.engine.sampling import SamplingParams
from tests.inference.test_shared_memory_room import room_of


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("random") / "shape"
    return write_random_model(path, tiny_config("llama3", num_hidden_layers=6), seed=7, on_device=True)


def test_a_split_draws_the_same_weights_as_the_whole(random_folder) -> None:
    assert not list(random_folder.glob("*.safetensors"))
    whole, stats = load_stage(random_folder, device="cpu", dtype="float32")
    assert stats.bytes_read == 0
    first, _ = load_stage(random_folder, 0, 4, device="cpu", dtype="float32")
    last, _ = load_stage(random_folder, 4, 6, device="cpu", dtype="float32")
    for name, tensor in whole.state_dict().items():
        if name.startswith("layers."):
            index = int(name.split(".")[1])
            part, local = (first, index) if index < 4 else (last, index - 4)
            tensor_there = part.state_dict()[name.replace(f"layers.{index}.", f"layers.{local}.", 1)]
        else:
            tensor_there = (first if name.startswith("embed") else last).state_dict()[name]
        assert torch.equal(tensor, tensor_there), name
    assert torch.equal(last.lm_head.weight, whole.embed.weight)  # tied: drawn as the embedding is


def test_a_bad_seed_file_is_a_clear_error(tmp_path) -> None:
    path = write_random_model(tmp_path / "m", tiny_config("llama"), on_device=True)
    (path / MARKER).write_text('{"seed": "seven"}')
    with pytest.raises(ModelLoadError, match="seed must be a whole number"):
        check_model_dir(path)


def test_a_room_of_a_random_folder_answers_as_one_node(random_folder, device, warm_layers) -> None:
    warm_layers(random_folder)
    engine, _ = LocalEngine.from_dir(random_folder, device="cpu", dtype="float32", max_seq=128)
    want = engine.generate([3, 9, 27, 81], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)).tokens

    async def main() -> None:
        async with await room_of(random_folder, device, 2) as stack:
            room = stack.room  # type: ignore[attr-defined]
            plan = await room.plan(60)
            assert len(plan.stages) == 2
            got = await room.generate([3, 9, 27, 81], temperature=0.0, max_tokens=10, ignore_eos=True)
            assert got.tokens == want

    asyncio.run(asyncio.wait_for(main(), 120))
