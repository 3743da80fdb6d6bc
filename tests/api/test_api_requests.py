"""Request parsing: every bad body is an ``ApiError`` naming its field, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.api.errors import ApiError
from peerpipe.api.requests import check_model, parse_chat, parse_completion
from peerpipe.api.server import host_name

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": USER, **fields}


def test_chat_fields_are_read() -> None:
    r = parse_chat(
        chat(
            messages=[
                {"role": "developer", "content": "be kind"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
            max_completion_tokens=7, temperature=0.5, top_p=0.9, top_k=-1, seed=3, stop="END",
            stream=True, stream_options={"include_usage": True}, user="x", presence_penalty=0,
        )
    )
    assert r.messages == (
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    )
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (7, 0.5, 0.9, 0, 3, ("END",))
    parse_chat(chat(tools=[{"type": "function"}], tool_choice="none"))  # (no tool may be called: served)
    nothing = parse_chat(chat(top_p=0, logprobs=False)).sampling  # as OpenAI: the likeliest token alone
    assert (nothing.top_p, nothing.top_k) == (None, 1)
    assert r.stream and r.include_usage


def test_completion_defaults_and_prompt_forms() -> None:
    r = parse_completion({"model": "m", "prompt": "hello"})
    assert r.sampling.max_tokens == 16 and r.sampling.temperature is None and not r.echo
    assert parse_completion({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert parse_completion({"model": "m", "prompt": [[4, 5]]}).prompt == (4, 5)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ([], None, None),
        ({"messages": USER}, "model", None),
        (chat(messages=[]), "messages", None),
        (chat(messages=["hi"]), "messages[0]", None),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", None),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content", "unsupported"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", None),
        (chat(temperature=2.5), "temperature", None),
        (chat(temperature="hot"), "temperature", None),
        (chat(temperature=float("nan")), "temperature", None),
        (chat(top_p=-0.1), "top_p", None),
        (chat(max_tokens=0), "max_tokens", None),
        (chat(max_tokens=True), "max_tokens", None),
        (chat(seed=1.5), "seed", None),
        (chat(stop=["a"] * 17), "stop", None),
        (chat(stop=[""]), "stop", None),
        (chat(stream="yes"), "stream", None),
        (chat(stream_options={"include_usage": True}), "stream_options", None),
        (chat(n=2), "n", "unsupported"),
        (chat(frequency_penalty=0.5), "frequency_penalty", "unsupported"),
        (chat(logprobs=True), "logprobs", "unsupported"),
        (chat(tools=[{"type": "function"}]), "tools", "unsupported"),
        (chat(response_format={"type": "json_object"}), "response_format", "unsupported"),
        (chat(repetition_penalty=0), "repetition_penalty", None),
        (chat(speculate="always"), "speculate", None),
        (chat(speculate=True), "speculate", None),
    ],
)
def test_bad_chat_bodies_name_their_field(body: object, param: str | None, code: str | None) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body)
    assert err.value.status == 400 and err.value.param == param and err.value.code == code
    assert err.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, -2]}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": 0}, "logprobs"),  # (the chosen tokens' alone: still refused)
        ({"model": "m", "prompt": "x", "echo": 1}, "echo"),
        ({"model": "m", "prompt": "x", "speculate": "fast"}, "speculate"),
    ],
)
def test_bad_completion_bodies_name_their_field(body: object, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert err.value.status == 400 and err.value.param == param


def test_unknown_model_is_404() -> None:
    check_model("m", "m")
    with pytest.raises(ApiError) as err:
        check_model("gpt-4", "m")
    assert err.value.status == 404 and err.value.code == "model_not_found"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed",
     "n", "logprobs", "stream_options", "echo", "min_p", "repetition_penalty", "response_format", "suffix"]
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(FIELDS, JSON, max_size=8) | JSON)
def test_fuzzed_bodies_parse_or_raise_api_error(body: object) -> None:
    json.dumps(body, allow_nan=True)  # any JSON value a client could send
    for parse in (parse_chat, parse_completion):
        try:
            parse(body)
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.message


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8088", "127.0.0.1"), ("localhost", "localhost"), ("LocalHost.:80", "localhost"),
        ("[::1]", "::1"), ("[::1]:8088", "::1"), ("::1", "::1"), ("evil.example:8088", "evil.example"),
        ("[::1].evil.example", "[::1].evil.example"),  # (not a name the guard lets through)
    ],
)
def test_the_host_guard_reads_the_name_in_a_host_header(header: str, name: str) -> None:
    assert host_name(header) == name
