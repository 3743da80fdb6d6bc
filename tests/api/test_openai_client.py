"""The official ``openai`` client against a real room: a host process and a member process, the
model split across both, answers checked token for token against the local engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.sampling import SamplingParams
from peerpipe.engine.tokenizer import Tokenizer
from tests.api.apiroom import ApiRoom, http, open_api_room, wait_feed

CONTEXT = 64
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def room(model: Path, warm_bench: None, warm_layers) -> Iterator[ApiRoom]:  # type: ignore[no-untyped-def]
    warm_layers(model)
    room = open_api_room(model, 1, code="4-amber-falcon", context=CONTEXT)
    yield room
    room.stop()


@pytest.fixture(scope="module")
def client(room: ApiRoom) -> openai.OpenAI:
    return openai.OpenAI(base_url=room.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(model: Path) -> LocalEngine:
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=CONTEXT)
    return engine


def greedy(engine: LocalEngine, ids: list[int], n: int) -> str:
    return engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)).text


def chat_ids(model: Path, text: str) -> list[int]:
    return Tokenizer.from_dir(model).apply_chat_template_ids([{"role": "user", "content": text}])


def test_models_lists_the_served_model(client: openai.OpenAI, model: Path) -> None:
    assert [m.id for m in client.models.list().data] == [model.name]
    assert client.models.retrieve(model.name).id == model.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_equals_the_local_engine_with_usage(client: openai.OpenAI, model: Path, engine: LocalEngine) -> None:
    ids = chat_ids(model, "Tell me about the sea")
    reply = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "Tell me about the sea"}],
        max_tokens=10, temperature=0, extra_body=NO_EOS,
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == greedy(engine, ids, 10)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 10)
    assert reply.usage.total_tokens == len(ids) + 10


def test_speculate_chooses_the_drafting_of_one_answer_and_reports_it(client: openai.OpenAI, model: Path, engine: LocalEngine) -> None:
    ids = chat_ids(model, "Tell me about the sea")
    answers = {}
    for mode in ("off", "ngram"):
        reply = client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "Tell me about the sea"}],
            max_tokens=10, temperature=0, extra_body={**NO_EOS, "speculate": mode},
        )
        answers[mode] = reply
    assert answers["off"].choices[0].message.content == answers["ngram"].choices[0].message.content == greedy(engine, ids, 10)
    assert (answers["off"].model_extra or {}).get("speculation") is None
    spec = (answers["ngram"].model_extra or {})["speculation"]
    assert spec["mode"] == "ngram" and spec["steps"] + spec["accepted"] == 9  # every token after the first
    stream = list(client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "Tell me about the sea"}],
        max_tokens=10, temperature=0, stream=True, extra_body={**NO_EOS, "speculate": "ngram"},
    ))
    last = next(c for c in stream if c.choices and c.choices[0].finish_reason)
    assert (last.model_extra or {})["speculation"] == spec  # a stream reports it too, on its finish
    with pytest.raises(openai.BadRequestError, match="no draft model"):
        client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "x"}], max_tokens=2, extra_body={"speculate": "draft"}
        )


def test_chat_stream_matches_the_whole_answer(client: openai.OpenAI, model: Path) -> None:
    kwargs = {
        "model": model.name, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 12, "temperature": 0.7, "seed": 11, "extra_body": NO_EOS,
    }
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))  # type: ignore[call-overload]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_seed_repeats_and_differs(client: openai.OpenAI, model: Path) -> None:
    def ask(seed: int) -> str:
        reply = client.completions.create(
            model=model.name, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=seed, extra_body=NO_EOS
        )
        return reply.choices[0].text

    assert ask(5) == ask(5)
    assert ask(5) != ask(6)
    assert ask(-1) == ask(-1)  # OpenAI's seeds are signed


def test_completions_plain_echo_and_stream(client: openai.OpenAI, model: Path, engine: LocalEngine) -> None:
    prompt = "The harbour at dawn"
    ids = engine.tokenizer.encode(prompt)
    expected = greedy(engine, ids, 8)
    reply = client.completions.create(model=model.name, prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(
        model=model.name, prompt=prompt, max_tokens=8, temperature=0, echo=True, extra_body=NO_EOS
    )
    assert echoed.choices[0].text == engine.tokenizer.decode(ids) + expected
    streamed = client.completions.create(
        model=model.name, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body=NO_EOS
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    by_ids = client.completions.create(model=model.name, prompt=ids, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert by_ids.choices[0].text == expected


def test_stop_string_cuts_the_answer(client: openai.OpenAI, model: Path, engine: LocalEngine) -> None:
    prompt = "Call me Ishmael"
    full = greedy(engine, engine.tokenizer.encode(prompt), 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    reply = client.completions.create(
        model=model.name, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], extra_body=NO_EOS
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == full[: full.index(stop)]


def test_32_concurrent_streams_do_not_mix(room: ApiRoom, model: Path, engine: LocalEngine) -> None:
    prompts = [f"Story number {i}: the" for i in range(32)]
    expected = [greedy(engine, engine.tokenizer.encode(p), 6) for p in prompts]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(
            model=model.name, prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body=NO_EOS
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=room.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == expected
    assert len(set(expected)) > 1  # distinct answers, so a swap would show


def test_errors_have_openai_shape(client: openai.OpenAI, room: ApiRoom, model: Path) -> None:
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-17", messages=user)  # type: ignore[arg-type]
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=model.name, prompt="word " * 200)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model=model.name, messages=user, n=2)  # type: ignore[arg-type]
    assert n.value.code == "unsupported"
    with pytest.raises(openai.BadRequestError) as temperature:
        client.chat.completions.create(model=model.name, messages=user, temperature=7)  # type: ignore[arg-type]
    assert temperature.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model.name, messages=[])
    status, _, body = http("POST", room.url + "/v1/chat/completions", b'{"model": "x", "messa', {})
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and "JSON" in error["message"]
    status, _, body = http("GET", room.url + "/v1/nothing-here")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, headers, body = http("GET", room.url + "/v1/chat/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed" and headers["Allow"] == "POST"
    status, _, body = http("POST", room.url + "/v1/completions", b" " * (5 << 20))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, _, body = http("POST", room.url + "/v1/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    # What a web page could send without asking: a plain-text body, or a rebound host name.
    text = json.dumps({"model": model.name, "prompt": "hi"}).encode()
    status, _, body = http("POST", room.url + "/v1/completions", text, {"Content-Type": "text/plain"})
    assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_media_type"
    status, _, body = http("GET", room.url + "/api/room", headers={"Host": "evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "bad_host"
    assert http("GET", room.url.replace("127.0.0.1", "localhost") + "/v1/models")[0] == 200
    status, _, body = http("POST", room.url + "/v1/completions", json.dumps({"model": model.name, "prompt": [10**9]}).encode())
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"


def test_metrics_count_tokens_and_stages(client: openai.OpenAI, room: ApiRoom, model: Path) -> None:
    client.completions.create(model=model.name, prompt="Metrics", max_tokens=5, temperature=0, extra_body=NO_EOS)
    # Members report their stage's counters with their heartbeats: wait until both have.
    wait_feed(room.url, lambda s: len(s["nodes"]) == 2 and all(n["steps"] > 0 for n in s["nodes"]))
    status, headers, body = http("GET", room.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}
    assert samples["peerpipe_generated_tokens_total"] >= 5
    assert samples['peerpipe_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    stage_counts = [v for k, v in samples.items() if k.startswith("peerpipe_stage_forward_seconds_count{")]
    assert len(stage_counts) == 2 and all(v > 0 for v in stage_counts)
    ages = [v for k, v in samples.items() if k.startswith("peerpipe_node_heartbeat_age_seconds{")]
    assert len(ages) == 2 and all(0 <= a < 5 for a in ages)
    assert samples["peerpipe_time_to_first_token_seconds_count"] >= 1
