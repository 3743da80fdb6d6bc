"""GGUF files (llama.cpp, Ollama, LM Studio) as peerpipe models.

The ``gguf`` package (llama.cpp's own) parses the file; from it we take the config (the metadata
turned into the Hugging Face ``config.json`` fields the engine reads), the tokenizer (rebuilt for
``tokenizers`` from the vocabulary, merges and special tokens), the chat template, and a stage's
tensors under their Hugging Face names, dequantized to float32 as they are read. The file is
memory-mapped, so a stage reads only the pages of its own tensors.

llama.cpp stores Llama's q and k projections permuted for its RoPE layout; they are permuted
back here, so the rest of the engine sees the Hugging Face layout it loads from safetensors.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peerpipe.engine.errors import ModelLoadError, TokenizerError, UnsupportedModelError
from peerpipe.engine.gguf_header import TensorInfo, read_header

MAGIC = b"GGUF"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Tensor types that load (dequantized to float32 at load, then to the run dtype).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# The pre-tokenizer split of each BPE flavour llama.cpp names (``tokenizer.ggml.pre``).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE = {"gpt2": None, "smollm": "digits", "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def is_gguf(path: str | Path) -> bool:
    """A file that starts like a GGUF (Ollama's blobs have no extension)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == MAGIC
    except OSError:
        return False


class GGUFModel:
    """One GGUF file: its config, tokenizer and tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        header = read_header(self.path)
        self.fields = header.fields
        self.arch = str(self._field("general.architecture", ""))
        if self.arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r}; peerpipe runs: {', '.join(ARCHITECTURES)}"
            )
        self._all = header.tensors
        self.tensors = {self._hf_name(t.name): t for t in header.tensors}
        self.tensors.pop("", None)
        size = self.path.stat().st_size
        for name, t in self.tensors.items():
            if t.offset + self.nbytes(name) > size:
                raise ModelLoadError(f"{self.path} ends before tensor {t.name} (truncated?)")
        # Copy-on-write: tensors are views of the file (no copy; torch wants writable memory), and
        # nothing written to them could ever reach the file.
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")

    # -- metadata ---------------------------------------------------------------------------

    def _field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self._field(f"{self.arch}.{key}", default)

    @functools.cached_property
    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` this file's metadata amounts to."""
        try:
            return self._hf_config()
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{self.path}: its metadata lacks or garbles what a config needs ({exc!r})") from None

    def _hf_config(self) -> dict[str, Any]:
        if self._arch_field("rope.scaling.type") not in (None, "none", "linear"):
            raise UnsupportedModelError(
                f"{self.path}: RoPE scaling {self._arch_field('rope.scaling.type')!r} from a GGUF is not supported; "
                "use the model's Hugging Face folder"
            )
        heads = int(self._arch_field("attention.head_count"))
        kv = self._arch_field("attention.head_count_kv", heads)
        hidden = int(self._arch_field("embedding_length"))
        config: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv if not isinstance(kv, list) else kv[0]),
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_field("context_length", 4096)),
            # The embedding's rows: a vocabulary padded past its last token still has them.
            "vocab_size": self.shape("model.embed_tokens.weight")[0]
            if "model.embed_tokens.weight" in self.tensors
            else len(self._field("tokenizer.ggml.tokens", [])),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "torch_dtype": "bfloat16",
        }
        if (key_length := self._arch_field("attention.key_length")) is not None:
            config["head_dim"] = int(key_length)
        if (factor := self._arch_field("rope.scaling.factor")) is not None and self._arch_field("rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        for key in ("bos_token_id", "eos_token_id"):
            if (value := self._field(f"tokenizer.ggml.{key}")) is not None:
                config[key] = int(value)
        freqs = next((t for t in self._all if t.name == "rope_freqs.weight"), None)
        if freqs is not None:  # Llama 3.1+: the frequency factors, not the parameters behind them
            from peerpipe.engine.gguf_rope import llama3_scaling

            if freqs.kind != 0:
                raise UnsupportedModelError(f"{self.path}: rope_freqs is {_type_name(freqs.kind)}, not F32")
            factors = torch.from_numpy(self._map[freqs.offset : freqs.offset + 4 * math.prod(freqs.dims)].view(np.float32).copy())
            config["rope_scaling"] = llama3_scaling(config, factors, self.path)
        return config

    @property
    def model_id(self) -> str:
        """The file's stem; for Ollama's blobs (named by digest) the model's own name."""
        if not self.path.name.startswith("sha256"):
            return self.path.stem
        name = f"{self._field('general.basename') or self._field('general.name') or 'gguf'}-{self._field('general.size_label') or ''}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()

    # -- tensors ----------------------------------------------------------------------------

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL:
            return _GLOBAL[name]
        m = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)", name)
        if m and m.group(2) in _LAYER:
            return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
        return ""  # tensors the engine has no use for (rope_freqs is refused above)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's logical shape in PyTorch order (GGUF lists dimensions innermost first)."""
        return tuple(reversed(self.tensors[name].dims))

    def nbytes(self, name: str) -> int:
        return tensor_bytes(self.tensors[name])

    def type_of(self, name: str) -> str:
        """The GGUF type a tensor is stored in (F16, Q4_K, …), by its Hugging Face name."""
        return _type_name(self.tensors[name].kind)

    def check_types(self, names: Iterable[str] | None = None) -> None:
        """``UnsupportedModelError`` for the first of ``names`` (default: every tensor) stored in
        a type peerpipe does not load: what a command checks before it announces anything."""
        for name in self.tensors if names is None else names:
            t = self.tensors[name]
            kind = _type_name(t.kind)
            if kind not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {t.name} is {kind}, which peerpipe does not load; it loads {', '.join(SUPPORTED_TYPES)}"
                )

    def read(self, name: str) -> torch.Tensor:
        """One tensor under its Hugging Face name, as float32 (Llama's q/k unpermuted)."""
        import gguf

        self.check_types([name])
        t = self.tensors[name]
        kind = _type_name(t.kind)
        shape = self.shape(name)
        rows = self._map[t.offset : t.offset + self.nbytes(name)].reshape(math.prod(shape[:-1]), -1)
        if kind in _TORCH_DEQUANT:
            tensor = _TORCH_DEQUANT[kind](torch.from_numpy(rows))
        else:
            tensor = torch.from_numpy(gguf.quants.dequantize(np.array(rows), gguf.GGMLQuantizationType[kind]).astype(np.float32))
        tensor = tensor.reshape(shape)
        if self.arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.hf_config["num_attention_heads" if ".q_proj" in name else "num_key_value_heads"]
            tensor = _unpermute(tensor, heads)
        return tensor

    # -- tokenizer --------------------------------------------------------------------------

    def tokenizer_parts(self) -> tuple[Any, dict[str, str], str | None]:
        """The ``tokenizers`` backend, the named special tokens, and the chat template."""
        try:
            return self._tokenizer_parts()
        except TokenizerError:
            raise
        except Exception as exc:  # the Rust library raises bare exceptions for malformed vocabularies
            raise TokenizerError(f"{self.path}: its vocabulary does not make a tokenizer ({exc})") from None

    def _tokenizer_parts(self) -> tuple[Any, dict[str, str], str | None]:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        kind = self._field("tokenizer.ggml.model")
        pre = self._field("tokenizer.ggml.pre", "gpt2")
        if kind == "llama":
            return self._sentencepiece_parts()
        if kind != "gpt2" or pre not in _PRE:
            raise TokenizerError(
                f"{self.path}: its tokenizer ({kind}, pre-tokenizer {pre}) cannot be rebuilt from a GGUF yet; "
                f"SentencePiece and byte-level BPE ({', '.join(_PRE)}) can. Use the model's Hugging Face folder"
            )
        tokens = [str(t) for t in self._field("tokenizer.ggml.tokens", [])]
        merges = [tuple(str(m).split(" ", 1)) for m in self._field("tokenizer.ggml.merges", [])]
        types = self._field("tokenizer.ggml.token_type", [1] * len(tokens))
        backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        split = _PRE[pre]
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif split == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
            )
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        if pre == "qwen2":  # Qwen's tokenizer composes text (NFC) before splitting it
            from tokenizers import normalizers

            backend.normalizer = normalizers.NFC()
        # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
        specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False) if k in (3, 4)]
        backend.add_special_tokens(specials)
        named = self._named_specials(tokens)
        self._add_bos(backend, named, tokens, default=False)
        return backend, named, self._field("tokenizer.chat_template")

    def _named_specials(self, tokens: list[str]) -> dict[str, str]:
        named = {}
        for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            index = self._field(f"tokenizer.ggml.{field}")
            if index is not None and 0 <= int(index) < len(tokens):
                named[key] = tokens[int(index)]
        return named

    def _add_bos(self, backend: Any, named: dict[str, str], tokens: list[str], *, default: bool) -> None:
        if self._field("tokenizer.ggml.add_bos_token", default) and "bos_token" in named:
            from tokenizers import processors

            bos = named["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
            )

    def _sentencepiece_parts(self) -> tuple[Any, dict[str, str], str | None]:
        """A SentencePiece BPE vocabulary (Llama 2, Mistral): pieces spelled with "▁" for spaces,
        bytes as <0xNN> fallbacks, and merges ranked by the merged piece's score (from the file's
        merges when it has them)."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        tokens = [str(t) for t in self._field("tokenizer.ggml.tokens", [])]
        scores = self._field("tokenizer.ggml.scores", [0.0] * len(tokens))
        types = self._field("tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges_field := self._field("tokenizer.ggml.merges"):
            merges = [tuple(str(m).split(" ", 1)) for m in merges_field]
        else:
            merges = _merges_from_scores(tokens, scores, vocab)
        named = self._named_specials(tokens)
        backend = Backend(models.BPE(vocab, merges, unk_token=named.get("unk_token"), fuse_unk=True, byte_fallback=True))
        prefix = bool(self._field("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False) if k == 3])
        self._add_bos(backend, named, tokens, default=True)
        return backend, named, self._field("tokenizer.chat_template")


def tensor_bytes(t: TensorInfo) -> int:
    """A tensor's bytes in the file (its type's blocks)."""
    block, size = _block(t.kind)
    return math.prod(t.dims) // block * size


def _block(kind: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise UnsupportedModelError(f"a tensor has GGML type {kind}, which this gguf package does not know") from None


def _type_name(kind: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(kind).name


# Dequantizers for the most common types, in torch (threaded, no temporaries per nibble): the
# numbers are those of gguf.quants, computed in the same order, so bit for bit the same.
def _f32(rows: torch.Tensor) -> torch.Tensor:
    return rows.view(torch.float32).clone()


def _f16(rows: torch.Tensor) -> torch.Tensor:
    return rows.view(torch.float16).float()


def _bf16(rows: torch.Tensor) -> torch.Tensor:
    return rows.view(torch.bfloat16).float()


def _q8_0(rows: torch.Tensor) -> torch.Tensor:
    blocks = rows.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return blocks.view(torch.int8)[:, 2:].float().mul_(d).reshape(rows.shape[0], -1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 float values: the low nibbles first, then the high ones, written
    straight into the float output (no concatenated byte copy: 15% of a Q4_1 model's load)."""
    out = torch.empty((qs.shape[0], 32), dtype=torch.float32)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    return out


def _q4_0(rows: torch.Tensor) -> torch.Tensor:
    blocks = rows.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return _nibbles(blocks[:, 2:]).sub_(8).mul_(d).reshape(rows.shape[0], -1)


def _q4_1(rows: torch.Tensor) -> torch.Tensor:
    blocks = rows.reshape(-1, 20)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return _nibbles(blocks[:, 4:]).mul_(d).add_(m).reshape(rows.shape[0], -1)


_TORCH_DEQUANT = {"F32": _f32, "F16": _f16, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every way to build a piece from two pieces, best-scored piece first (SentencePiece's merge
    order), ties by the left part's length, then the right's; within a piece, by the parts' ids."""
    found = []
    for token, score in zip(tokens, scores, strict=False):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found += [(left, right, float(score)) for left, right in splits]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head, its pairs back to two halves."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, out // heads // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def open_gguf(path: str) -> GGUFModel:
    """Each file parsed once per process (config, tokenizer and loader all ask for it), again
    when it changed on disk."""
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _open(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFModel:
    return GGUFModel(path)


open_gguf.cache_clear = _open.cache_clear  # type: ignore[attr-defined]
