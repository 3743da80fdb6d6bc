"""The tokenizer of a Hugging Face model folder, without ``transformers``.

We load ``tokenizer.json`` with the ``tokenizers`` library and read the special tokens and
flags from ``tokenizer_config.json``, ``generation_config.json`` and ``config.json``, applying
them the way ``transformers`` does so that token ids match it exactly.

Whether ``encode`` adds BOS/EOS is decided by tokenizer.json's post-processor alone:
transformers 5 ignores ``add_bos_token``/``add_eos_token`` whenever tokenizer.json exists, and
so do we (Llama 3 adds BOS there, Qwen adds nothing).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from peerpipe.engine.chat import ChatTemplate, Message
from peerpipe.engine.errors import TokenizerError

_REPLACEMENT = "\ufffd"
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path} not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    # Older configs store special tokens as serialized AddedToken dicts.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Text <-> token ids, special tokens, and the chat template of one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        extra_eos_ids: Iterable[int] = (),
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self._backend = backend
        self.special_tokens = dict(special_tokens)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_id: int | None = self._id_of(self.bos_token)
        eos_id = self._id_of(self.eos_token)
        # Generation stops on any of them: instruct models often end turns with a token other
        # than the tokenizer's eos (e.g. <|eot_id|>, <|im_end|>) and list it only in the configs.
        self.eos_ids: frozenset[int] = frozenset([*([eos_id] if eos_id is not None else []), *extra_eos_ids])
        self.chat_template = chat_template or ChatTemplate(None, self.special_tokens)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face folder, or from a GGUF file's vocabulary."""
        path = Path(path)
        if path.is_file():
            return cls.from_gguf(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{file} not found; peerpipe needs the fast-tokenizer file that Hugging Face models ship"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust loader raises bare Exception on any parse failure
            raise TokenizerError(f"{file} could not be loaded: {e}") from e
        tcfg = _read_json(path / "tokenizer_config.json")
        special = {k: _token_text(tcfg.get(k)) for k in _NAMED_SPECIAL}
        special = {k: v for k, v in special.items() if v is not None}
        extra_eos = [
            *_ids(_read_json(path / "generation_config.json").get("eos_token_id")),
            *_ids(_read_json(path / "config.json").get("eos_token_id")),
        ]
        template = ChatTemplate.from_dir(path, tcfg, special)
        return cls(backend, special_tokens=special, extra_eos_ids=extra_eos, chat_template=template)

    @classmethod
    def from_gguf(cls, path: Path) -> Tokenizer:
        from peerpipe.engine.gguf_file import open_gguf

        model = open_gguf(str(path))
        backend, special, template = model.tokenizer_parts()
        eos = _ids(model.hf_config.get("eos_token_id"))
        chat = ChatTemplate(template, special, origin=str(path)) if template else None
        return cls(backend, special_tokens=special, extra_eos_ids=eos, chat_template=chat)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Every token's text and id, added tokens included (two models share a vocabulary when
        these are equal)."""
        return self._backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # transformers skips clean_up_tokenization_spaces for BPE models; so do we, always.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def apply_chat_template_ids(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, **extra)
        # Templates write BOS themselves; adding it again would double it (transformers agrees).
        return self.encode(text, add_special_tokens=self.chat_template.is_fallback)


class StreamDecoder:
    """Turn ids into text as they arrive, never splitting a multi-byte character.

    Each call to ``push`` returns the new text (possibly empty). Text is held back while it ends
    in U+FFFD, the sign of an incomplete UTF-8 sequence. The pieces, followed by ``flush()``,
    concatenate to exactly ``decode(all_ids)``. Only a window of recent ids is re-decoded, so the
    cost per token stays constant however long the output grows.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # ids[_prefix:_read] were already emitted and are re-decoded only as context, because
        # some decoders (SentencePiece's Metaspace) change a token's text by its position.
        self._prefix = 0
        self._read = 0

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def _pending(self) -> tuple[str, str]:
        emitted = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self._ids[self._prefix :], self._skip)
        return emitted, full

    def push(self, ids: int | Iterable[int]) -> str:
        self._ids.extend([ids] if isinstance(ids, int) else ids)
        emitted, full = self._pending()
        if full.endswith(_REPLACEMENT) or len(full) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted) :]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes as U+FFFD)."""
        emitted, full = self._pending()
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :]
