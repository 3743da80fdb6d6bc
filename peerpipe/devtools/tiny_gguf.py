"""Write a Hugging Face folder (a tiny test model) as a GGUF file, as llama.cpp's converter does:
llama.cpp's tensor names and metadata, Llama's q/k permuted for its RoPE layout, the linear layers
in a chosen GGML type, and the byte-level BPE vocabulary with its merges.

It returns the weights the file really holds, dequantized and under Hugging Face names, so a test
can compare a model loaded from the GGUF with the same numbers loaded from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# K-quant blocks (256 values): byte offsets of their float16 scale fields, which random bytes
# would fill with infinities; the writer sets them to small numbers instead.
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, index, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{index}.{_NAMES[module]}.{kind}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation for Llama (each head's halves interleaved into pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``w`` in GGML type ``kind``: the bytes to write and the values they decode to."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind in _K_BLOCKS:
        size, scales = _K_BLOCKS[kind]
        blocks = w.size // 256
        raw = rng.integers(0, 256, (blocks, size), dtype=np.uint8)
        for offset in scales:
            raw[:, offset : offset + 2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        raw = raw.reshape(w.shape[0], -1)
    else:
        raw = gguf.quants.quantize(w.astype(np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(w.shape)


def write_gguf(
    src: Path,
    dest: Path,
    *,
    linear: str = "F32",
    embed: str = "F32",
    seed: int = 0,
    architecture: str | None = None,
    sentencepiece: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``src`` (a Hugging Face folder) to ``dest``; linear weights in ``linear``, the
    embedding in ``embed``. Returns what the file holds, dequantized, by Hugging Face name."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((src / "config.json").read_text())
    arch = architecture or ARCH[config["architectures"][0]]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    weights: dict[str, np.ndarray] = {}
    for file in sorted(src.glob("*.safetensors")):
        weights.update(load_file(file))
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(dest, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if sentencepiece is None:
        _add_tokenizer(writer, src, config)
    else:
        _add_sentencepiece(writer, sentencepiece)
    held: dict[str, np.ndarray] = {}
    for name, w in sorted(weights.items()):
        w = w.astype(np.float32)
        stored = _permute(w, heads if "q_proj" in name else kv) if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")) else w
        kind = embed if name == "model.embed_tokens.weight" else linear if w.ndim == 2 else "F32"
        if kind in ("F32", "F16"):
            data = stored.astype(np.float16 if kind == "F16" else np.float32)
            writer.add_tensor(gguf_name(name), data)
            decoded = data.astype(np.float32)
        else:
            raw, decoded = _encode(stored, kind, rng)
            writer.add_tensor(gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            decoded = _unpermute(decoded, heads if "q_proj" in name else kv)
        held[name] = decoded
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # llama.cpp writes Llama 3.1's scaling as per-dimension factors, not as its parameters.
        writer.add_tensor("rope_freqs.weight", _rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _rope_factors(config: dict[str, Any]) -> np.ndarray:
    import torch

    from peerpipe.engine.config import ModelConfig
    from peerpipe.engine.rope import rope_inv_freq

    cfg = ModelConfig.from_hf(config)
    base = 1.0 / (cfg.rope.theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    return (base / rope_inv_freq(cfg.rope, cfg.head_dim)).numpy().astype(np.float32)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, src: Path, config: dict[str, Any]) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    size = max([*vocab.values(), *added.values()]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # unused
    for text, i in vocab.items():
        tokens[i], types[i] = text, 1
    for text, i in added.items():
        tokens[i], types[i] = text, 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if config.get("model_type", "").startswith("qwen") else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        token = tcfg.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in added:
            add(added[token])
    if isinstance(tcfg.get("chat_template"), str):
        writer.add_chat_template(tcfg["chat_template"])


def _add_sentencepiece(writer: Any, words: list[str]) -> None:
    """A SentencePiece-style vocabulary as Llama 2 GGUFs carry it, grown from ``words``: control
    tokens, the 256 byte fallbacks, every character, then each word (with its leading "▁") and its
    prefixes; scores fall with the order, so longer pieces merge last."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces: list[str] = []
    for word in words:
        piece = "\u2581" + word
        for end in range(1, len(piece) + 1):
            if piece[:end] not in pieces:
                pieces.append(piece[:end])
    pieces.sort(key=len)  # every piece's parts come before it
    tokens += pieces
    types += [1] * len(pieces)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
