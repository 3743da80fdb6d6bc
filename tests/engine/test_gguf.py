"""GGUF files as models: every supported tensor type loads to exactly the numbers the file holds
(the same logits as those numbers loaded from safetensors), the stage reads only its share,
bad files are one clear error, and Ollama's store is read in place."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from peerpipe.devtools.tiny_gguf import write_gguf
from peerpipe.engine.config import ModelConfig
from peerpipe.engine.errors import ModelLoadError, UnsupportedModelError
from peerpipe.engine.loader import check_model_dir, load_stage
from peerpipe.engine.model import Stage
from peerpipe.models import resolve_model
from peerpipe.models.ollama import OllamaModelError

pytest.importorskip("gguf")

# Wide enough for K-quants (256-value blocks along each row).
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "head_dim": 64}
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _run(stage: Stage, ids: torch.Tensor) -> torch.Tensor:
    cache = stage.new_cache(max_slots=1, max_seq=ids.shape[1])
    with torch.inference_mode():
        return stage(ids, cache, cache.batch([cache.alloc()], ids.shape[1]))


def _as_folder(src: Path, held: dict[str, np.ndarray], dest: Path) -> Path:
    """``src`` with its weights replaced by what the GGUF holds."""
    shutil.copytree(src, dest)
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    save_file({k: np.ascontiguousarray(v) for k, v in held.items()}, dest / "model.safetensors")
    return dest


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "qwen3"])
def test_each_type_loads_the_numbers_the_file_holds(tiny_model_dir, tmp_path: Path, arch: str, kind: str) -> None:
    src = tiny_model_dir(arch, config_overrides=SHAPE)
    held = write_gguf(src, tmp_path / "m.gguf", linear=kind, embed="Q8_0" if kind == "Q4_1" else "F32")
    reference = _as_folder(src, held, tmp_path / "ref")
    ids = torch.tensor([[3, 17, 42, 9, 100, 5, 61]])
    expected = _run(load_stage(reference, device="cpu")[0], ids)
    got = _run(load_stage(tmp_path / "m.gguf", device="cpu")[0], ids)
    assert torch.equal(got, expected)
    # Split in two stages, as a room runs it: the same.
    first, _ = load_stage(tmp_path / "m.gguf", 0, 2, device="cpu")
    last, _ = load_stage(tmp_path / "m.gguf", 2, 3, device="cpu")
    cache_a, cache_b = first.new_cache(max_slots=1, max_seq=7), last.new_cache(max_slots=1, max_seq=7)
    with torch.inference_mode():
        hidden = first(ids, cache_a, cache_a.batch([cache_a.alloc()], 7))
        assert torch.equal(last(hidden, cache_b, cache_b.batch([cache_b.alloc()], 7)), expected)


def test_a_stage_reads_only_its_tensors(tiny_model_dir, tmp_path: Path) -> None:
    write_gguf(tiny_model_dir("llama", config_overrides=SHAPE), tmp_path / "m.gguf", linear="Q8_0")
    _, whole = load_stage(tmp_path / "m.gguf", device="cpu")
    _, middle = load_stage(tmp_path / "m.gguf", 1, 2, device="cpu")
    assert middle.bytes_read < whole.bytes_read / 2 and whole.bytes_read <= whole.checkpoint_bytes


def test_config_tokenizer_and_template_come_from_the_metadata(tiny_model_dir, tmp_path: Path) -> None:
    from peerpipe.engine.tokenizer import Tokenizer

    src = tiny_model_dir("qwen2", config_overrides=SHAPE)
    write_gguf(src, tmp_path / "m.gguf")
    cfg, ref = ModelConfig.from_dir(tmp_path / "m.gguf"), ModelConfig.from_dir(src)
    assert cfg.shape_key == ref.shape_key and cfg.tie_embeddings == ref.tie_embeddings
    ours, theirs = Tokenizer.from_dir(tmp_path / "m.gguf"), Tokenizer.from_dir(src)
    for text in ["Hello world", "numbers 1234 and 3.14", "  spaces\tand\nlines", "über naïve", "cafe\u0301 (decomposed)"]:
        assert ours.encode(text) == theirs.encode(text), text
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template_ids(messages) == theirs.apply_chat_template_ids(messages)
    assert ours.eos_ids == theirs.eos_ids or ours.eos_ids <= theirs.eos_ids
    assert check_model_dir(tmp_path / "m.gguf").n_layers == 3


def test_bad_files_are_one_clear_error(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("llama", config_overrides=SHAPE)
    write_gguf(src, tmp_path / "m.gguf", linear="Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "m.gguf").read_bytes()[:-5000])
    with pytest.raises(ModelLoadError, match="truncated"):
        ModelConfig.from_dir(cut)
    write_gguf(src, tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'"):
        ModelConfig.from_dir(tmp_path / "gpt2.gguf")
    write_gguf(src, tmp_path / "q2.gguf", linear="Q2_K")
    with pytest.raises(UnsupportedModelError, match="Q2_K"):
        load_stage(tmp_path / "q2.gguf", device="cpu")
    with pytest.raises(UnsupportedModelError, match="Q2_K"):  # what a host checks before it hands out a code
        check_model_dir(tmp_path / "q2.gguf")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        ModelConfig.from_dir(tmp_path / "notes.txt")


def test_ollama_models_resolve_to_their_blob_in_place(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "ollama"
    (root / "blobs").mkdir(parents=True)
    gguf_file = tmp_path / "m.gguf"
    write_gguf(tiny_model_dir("llama", config_overrides=SHAPE), gguf_file)
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    shutil.move(gguf_file, blob)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"},
    ]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert resolve_model("ollama:tiny:1b") == blob
    assert ModelConfig.from_dir(blob).n_layers == 3
    with pytest.raises(OllamaModelError, match="ollama pull tiny"):
        resolve_model("ollama:tiny")  # no "latest" tag here
    with pytest.raises(OllamaModelError, match="not an Ollama model name"):
        resolve_model("ollama:../../etc:passwd")


def test_any_corruption_of_the_header_is_a_clear_error(tiny_model_dir, tmp_path: Path) -> None:
    """Cut short or with bytes flipped anywhere in its header, a GGUF is a typed engine error (or,
    where the flip is harmless, a model that loads): never another exception, never a hang on a
    huge length. Seeded, so a failure replays."""
    import random

    from peerpipe.engine.errors import EngineError
    from peerpipe.engine.gguf_header import read_header

    write_gguf(tiny_model_dir("llama", config_overrides=SHAPE), tmp_path / "m.gguf", linear="Q8_0")
    good = (tmp_path / "m.gguf").read_bytes()
    header_end = min(t.offset for t in read_header(tmp_path / "m.gguf").tensors)
    rng = random.Random(7)
    outcomes = {"loads": 0, "refused": 0}
    for case in range(1000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(header_end)] ^= rng.randint(1, 255)
        if rng.random() < 0.3:
            data = data[: rng.randrange(header_end)]
        bad = tmp_path / f"bad{case % 2}.gguf"
        bad.write_bytes(bytes(data))
        try:
            check_model_dir(bad)
            load_stage(bad, device="cpu")
            outcomes["loads"] += 1
        except EngineError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 800, outcomes


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 128},
])
def test_llama31_rope_factors_give_the_models_own_frequencies(tiny_model_dir, tmp_path: Path, scaling: dict) -> None:
    """llama.cpp keeps Llama 3.1's scaling as per-dimension factors; the parameters recovered
    from them give the engine the very frequencies of the original config."""
    from peerpipe.engine.rope import rope_inv_freq

    src = tiny_model_dir("llama3", config_overrides={**SHAPE, "rope_scaling": scaling, "max_position_embeddings": 256})
    write_gguf(src, tmp_path / "m.gguf")
    # Equal parameters where they are Llama's own (low 1); equivalent ones otherwise (the factors
    # fix only two combinations of the three), equal to float32 rounding.
    mine, original = ModelConfig.from_dir(tmp_path / "m.gguf"), ModelConfig.from_dir(src)
    ours, theirs = rope_inv_freq(mine.rope, mine.head_dim), rope_inv_freq(original.rope, original.head_dim)
    assert torch.equal(ours, theirs) if scaling["low_freq_factor"] == 1.0 else torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def test_rope_factors_that_are_not_llama3s_are_refused(tiny_model_dir, tmp_path: Path) -> None:
    import gguf

    src = tiny_model_dir("llama", config_overrides=SHAPE)
    write_gguf(src, tmp_path / "m.gguf")
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    # Rewrite the file with a made-up factor per dimension.
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    writer = gguf.GGUFWriter(tmp_path / "odd.gguf", "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.add_tensor("rope_freqs.weight", np.linspace(3.0, 1.0, 32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert data  # the original stays as it was
    with pytest.raises(UnsupportedModelError, match="not Llama 3's scaling"):
        ModelConfig.from_dir(tmp_path / "odd.gguf")


def test_a_sentencepiece_vocabulary_tokenizes_as_transformers_does(tiny_model_dir, tmp_path: Path) -> None:
    """Llama 2 and Mistral GGUFs carry SentencePiece pieces and scores, no merges: the merges are
    rebuilt from the scores, bytes fall back to <0xNN>, and encoding and decoding agree with
    transformers' own GGUF tokenizer."""
    import random

    transformers = pytest.importorskip("transformers")
    from peerpipe.engine.tokenizer import Tokenizer

    words = (Path(__file__).parent / "austen_words.txt").read_text(encoding="utf-8").split()[:400]
    write_gguf(tiny_model_dir("llama", config_overrides=SHAPE), tmp_path / "spm.gguf", sentencepiece=words)
    ours = Tokenizer.from_dir(tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    rng = random.Random(3)
    texts = [" ".join(rng.choice([*words, "Zebra", "naïve", "12", "日本", "😀", "  "]) for _ in range(rng.randint(1, 9))) for _ in range(200)]
    texts += ["Hello", " leading space", "trailing space ", "tab\\there", "new\\nline"]
    bad = [t for t in texts if ours.encode(t) != theirs.encode(t)]
    assert not bad, [(t, ours.encode(t), theirs.encode(t)) for t in bad[:3]]
    for t in texts:
        ids = theirs.encode(t)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), t
    assert ours.encode("x")[0] == 1  # BOS, as add_bos_token says
