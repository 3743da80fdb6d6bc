"""OpenAI request bodies -> typed, validated requests.

Pure functions over the decoded JSON: every field is checked here, so the server only runs
requests that make sense, and every refusal names its field in OpenAI's error shape. Fields
OpenAI has and we cannot honour (tools, logprobs, n > 1...) are refused, not silently ignored;
fields that change nothing here (``user``, ``metadata``, ``store``) are accepted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from peerpipe.api.errors import ApiError, bad_request, unsupported
from peerpipe.engine.errors import InvalidSamplingParams  # no torch: clients import this
from peerpipe.inference.sampling import sampling_from
from peerpipe.protocol import Sampling

MAX_STOP = 16
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, str], ...]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    speculate: str = ""  # an extension: off, ngram or draft for this answer ("": the room's)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | tuple[int, ...]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    speculate: str = ""


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _number(body: dict[str, Any], name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > hi or value < lo or (lo_open and value == lo):
        low = f"({lo}" if lo_open else f"[{lo}"
        raise bad_request(f"{name} must be a number in {low}, {hi}], got {value!r}", param=name)
    return float(value)


def _int(body: dict[str, Any], name: str, lo: int, hi: int = 2**63 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", param=name)
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: a model id from GET /v1/models", param="model")
    return model


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    return tuple(stop)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = _int(body, "n", 1, 128)
    if n not in (None, 1):
        raise unsupported("n", "more than one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0) not in (None, 0.0):
            raise unsupported(name, "a non-zero value (use repetition_penalty)")
    logprobs = body.get("logprobs")
    # (a completion's ``logprobs: 0`` asks for the chosen tokens' log-probabilities, and 0 == False)
    if not (logprobs is None or logprobs is False) or body.get("top_logprobs") not in (None, 0):
        raise unsupported("logprobs", "returning log-probabilities")
    # With tool_choice "none" the model is not to call any: the tools are left out, as unused.
    if (body.get("tools") or body.get("functions")) and "none" not in (body.get("tool_choice"), body.get("function_call")):
        raise unsupported("tools", "tool calling")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise unsupported(name, "tool calling")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise unsupported("response_format", "a format other than text")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "biasing tokens")


def _sampling(body: dict[str, Any], max_tokens_fields: tuple[str, ...]) -> Sampling:
    _refuse_unsupported(body)
    max_tokens = None
    for name in max_tokens_fields:
        value = _int(body, name, 1)
        if value is not None:
            max_tokens = min(value, 1 << 20)  # beyond any context: it is cut to the context anyway
    top_k = _int(body, "top_k", -1, 1 << 31)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:  # OpenAI takes 0: a nucleus of nothing keeps the likeliest token alone
        top_p, top_k = None, 1
    fields = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": top_p,
        "top_k": None if top_k is None else max(top_k, 0),  # vLLM's -1 means off, as our 0 does
        "min_p": _number(body, "min_p", 0.0, 1.0) or 0.0,
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 10.0, lo_open=True) or 1.0,
        # OpenAI's seeds are signed 64-bit; the stages' generators take unsigned ones.
        "seed": None if seed is None else seed % 2**63,
        "stop": _stop(body),
        "ignore_eos": _bool(body, "ignore_eos"),
    }
    try:
        return sampling_from(fields)  # the one way into the wire's record, as for the CLI and Python
    except InvalidSamplingParams as exc:
        raise bad_request(str(exc)) from exc


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    return _bool(options, "include_usage")


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    where = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise unsupported(where, f"a content part of type {kind!r} (only text)")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where} must be a string or a list of text parts", param=where)


def parse_chat(body: object) -> ChatRequest:
    body = _object(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(
                f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}",
                param=f"messages[{i}].role",
            )
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        parsed.append({"role": "system" if role == "developer" else role, "content": _content(message, i)})
    stream = _bool(body, "stream")
    return ChatRequest(
        model,
        tuple(parsed),
        _sampling(body, ("max_tokens", "max_completion_tokens")),
        stream,
        _include_usage(body, stream),
        _speculate(body),
    )


def _prompt(body: dict[str, Any]) -> str | tuple[int, ...]:
    prompt = body.get("prompt")
    # OpenAI accepts batches; one prompt per request is what we serve, in any of its forms.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise bad_request("prompt token ids must be >= 0", param="prompt")
        return tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise unsupported("prompt", "a batch of several prompts in one request")
    raise bad_request("prompt must be a string or a list of token ids", param="prompt")


def parse_completion(body: object) -> CompletionRequest:
    body = _object(body)
    model = _model(body)
    prompt = _prompt(body)
    if body.get("suffix"):
        raise unsupported("suffix", "inserting text (fill in the middle)")
    if _int(body, "best_of", 1, 128) not in (None, 1):
        raise unsupported("best_of", "more than one candidate")
    sampling = _sampling(body, ("max_tokens",))
    if sampling.max_tokens is None:
        # OpenAI's legacy completions stop after 16 tokens unless told otherwise.
        sampling = dataclasses.replace(sampling, max_tokens=16)
    stream = _bool(body, "stream")
    return CompletionRequest(
        model, prompt, sampling, stream, _include_usage(body, stream), _bool(body, "echo"), _speculate(body)
    )


SPECULATE_MODES = ("off", "ngram", "draft")


def _speculate(body: dict[str, Any]) -> str:
    """peerpipe's extension field: how the host drafts this answer (docs/speculative.md)."""
    value = body.get("speculate")
    if value is None:
        return ""
    if value not in SPECULATE_MODES:
        raise bad_request(f"speculate must be one of {', '.join(SPECULATE_MODES)}, got {value!r}", param="speculate")
    return value


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(
            404,
            f"the model {requested!r} does not exist here; this room serves {served!r}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
