"""OpenAI response objects and stream chunks, built from our results."""

from __future__ import annotations

import json
import time
from typing import Any

from peerpipe.engine.generate import GenerationResult

# Our finish reasons are OpenAI's, except a cancel, which OpenAI has no word for.
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def finish_reason(result: GenerationResult) -> str:
    return _FINISH.get(result.finish_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def speculation(result: GenerationResult) -> dict[str, Any]:
    """peerpipe's extension: what drafting did for the answer (nothing when it did not draft)."""
    return {"speculation": result.speculation.to_json()} if result.speculation is not None else {}


def _head(job_id: str, kind: str, model: str, created: int) -> dict[str, Any]:
    return {"id": job_id, "object": kind, "created": created, "model": model, "system_fingerprint": "peerpipe"}


def chat_completion(job_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        **_head(job_id, "chat.completion", model, int(time.time())),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage(len(result.prompt_ids), len(result.tokens)),
        **speculation(result),
    }


def completion(job_id: str, model: str, result: GenerationResult, echo: str = "") -> dict[str, Any]:
    return {
        **_head(job_id, "text_completion", model, int(time.time())),
        "choices": [{"index": 0, "text": echo + result.text, "logprobs": None, "finish_reason": finish_reason(result)}],
        "usage": usage(len(result.prompt_ids), len(result.tokens)),
        **speculation(result),
    }


class ChunkWriter:
    """The ``data:`` lines of one streamed answer, chat or legacy completion."""

    def __init__(self, job_id: str, model: str, *, chat: bool) -> None:
        self.chat = chat
        self.head = _head(job_id, "chat.completion.chunk" if chat else "text_completion", model, int(time.time()))

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**self.head, "choices": choices, **extra}).encode() + b"\n\n"

    def first(self) -> bytes | None:
        """Chat streams open with the assistant's role; legacy completions have no such chunk."""
        if not self.chat:
            return None
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def text(self, piece: str) -> bytes:
        if self.chat:
            return self._event([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])
        return self._event([{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}])

    def last(self, result: GenerationResult) -> bytes:
        """The chunk with the finish reason; it carries the answer's ``speculation`` as a whole answer does."""
        reason = finish_reason(result)
        if self.chat:
            return self._event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}], **speculation(result))
        return self._event([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}], **speculation(result))

    def usage(self, result: GenerationResult) -> bytes:
        return self._event([], usage=usage(len(result.prompt_ids), len(result.tokens)))

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"
