"""A client's messages with the room's host: ask for an answer, get its text as it streams, then
its end. Part of the closed union in ``messages.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peerpipe.protocol.records import MAX_MEMBERS, Sampling
from peerpipe.protocol.validate import (
    MAX_NAME_LEN,
    need_bool,
    need_choice,
    need_float,
    need_id,
    need_instance,
    need_int,
    need_str,
    need_tuple_of,
)

MAX_PROMPT_LEN = 1 << 20


MAX_WAIT_S = 86400.0
SPECULATE_CHOICES = frozenset({"", "off", "ngram", "draft"})


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A client asks the room's host for an answer; ``chat`` wraps the prompt in the model's chat
    template."""

    TAG: ClassVar[str] = "generate-request"
    request_id: str
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    chat: bool = False
    system: str = ""
    prompt_ids: tuple[int, ...] = ()  # when given, the prompt's token ids (prompt is then unused)
    wait_s: float = 0.0  # how long the client lets the host wait for the room to be ready (0: the host's own wait)
    speculate: str = ""  # "off", "ngram" or "draft" for this answer ("": the host's setting)

    def __post_init__(self) -> None:
        need_id(self, "request_id")
        need_str(self, "prompt", MAX_PROMPT_LEN)
        need_instance(self, "sampling", Sampling)
        need_tuple_of(self, "prompt_ids", int, 1 << 20)
        need_bool(self, "chat")
        need_str(self, "system")
        need_float(self, "wait_s", 0.0, MAX_WAIT_S)
        need_choice(self, "speculate", SPECULATE_CHOICES)


@dataclass(frozen=True, slots=True)
class GenerateText:
    """Text of the answer to ``request_id`` as it streams (never part of a stop string)."""

    TAG: ClassVar[str] = "generate-text"
    request_id: str
    text: str

    def __post_init__(self) -> None:
        need_id(self, "request_id")
        need_str(self, "text", MAX_PROMPT_LEN)


@dataclass(frozen=True, slots=True)
class GenerateDone:
    """The end of the answer to ``request_id``: ``error`` is empty on success. ``stages`` says
    where it ran (one entry: on the host alone)."""

    TAG: ClassVar[str] = "generate-done"
    request_id: str
    finish_reason: str
    text: str
    tokens: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    prefill_s: float
    decode_s: float
    error: str = ""
    stages: tuple[str, ...] = ()
    speculate: str = ""  # how it was drafted ("": not at all), and what that did:
    steps: int = 0  # decode steps through the model
    drafted: int = 0  # tokens drafted for them
    accepted: int = 0  # drafts kept

    def __post_init__(self) -> None:
        need_id(self, "request_id")
        need_str(self, "finish_reason", MAX_NAME_LEN)
        need_str(self, "text", MAX_PROMPT_LEN)
        need_tuple_of(self, "tokens", int, 1 << 20)
        need_tuple_of(self, "prompt_ids", int, 1 << 20)
        need_float(self, "prefill_s")
        need_float(self, "decode_s")
        need_str(self, "error")
        need_tuple_of(self, "stages", str, MAX_MEMBERS)
        need_choice(self, "speculate", SPECULATE_CHOICES)
        for name in ("steps", "drafted", "accepted"):
            need_int(self, name, 0, 1 << 40)
