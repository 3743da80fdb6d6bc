"""Sampling: HF-equal filters, seeded and batch-independent draws, and stop conditions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from peerpipe.engine.sampling import (
    InvalidSamplingParams,
    Sampler,
    SamplingParams,
    StopChecker,
    apply_repetition_penalty,
    argmax_chunk,
    make_generator,
    row_argmax,
    warp,
)
from peerpipe.engine.tokenizer import Tokenizer

MakeTiny = Callable[..., Path]
NEG = float("-inf")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("seed", 1.0),
        ("seed", True),
        ("max_tokens", 0),
        ("stop", ("",)),
        ("stop", (3,)),
        ("stop_token_ids", (-1,)),
        ("ignore_eos", 1),
    ],
)
def test_params_validation(field: str, value: Any) -> None:
    with pytest.raises(InvalidSamplingParams, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError):  # callers that only know ValueError still catch it
        SamplingParams(**{field: value})


def test_params_normalized_and_hashable() -> None:
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[5])  # type: ignore[arg-type]
    assert p.stop == ("a", "b") and p.stop_token_ids == (5,)
    assert hash(p) == hash(dataclasses.replace(p))
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_greedy_is_argmax_without_copy() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 5
    assert torch.equal(Sampler().sample(logits, params), logits.argmax(-1))
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2 + [SamplingParams(0.0)]
    out = Sampler().sample(logits, mixed, [make_generator(i) for i in range(5)])
    assert out[[0, 2, 4]].tolist() == logits.argmax(-1)[[0, 2, 4]].tolist()


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_two_pass_argmax_picks_the_first_maximum(chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    # Few distinct values: ties inside a chunk, across chunks, and a row's maximum at the very
    # start or end; NaN wins as in torch.argmax.
    x = torch.randint(0, 4, (64, 448), generator=g).float()
    x[1, 0] = x[2, -1] = 9.0
    x[3, 5] = x[3, 300] = float("nan")
    x[4] = float("-inf")
    assert torch.equal(row_argmax(x, chunk), x.argmax(-1))


def test_argmax_chunk_divides_the_vocabulary_or_declines() -> None:
    assert argmax_chunk(128256) == 501 and argmax_chunk(49152) == 512
    assert argmax_chunk(32000) == 500 and argmax_chunk(151936) == 128
    assert argmax_chunk(4096) is None  # short rows: one pass is already fast
    assert argmax_chunk(2 * 65521) is None  # 65521 is prime: no divisor near 512


# probabilities 0.5, 0.2, 0.15, 0.1, 0.05 -> which token ids survive the filters
PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


@pytest.mark.parametrize(
    ("kw", "kept"),
    [
        ({}, {0, 1, 2, 3, 4}),
        ({"top_k": 1}, {0}),
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 99}, {0, 1, 2, 3, 4}),
        ({"top_p": 0.45}, {0}),
        ({"top_p": 0.55}, {0, 1}),
        ({"top_p": 0.72}, {0, 1, 2}),
        ({"top_p": 0.9}, {0, 1, 2, 3}),
        ({"min_p": 0.15}, {0, 1, 2, 3}),  # floor 0.075
        ({"min_p": 0.25}, {0, 1, 2}),  # floor 0.125
        ({"min_p": 0.35}, {0, 1}),  # floor 0.175
        ({"min_p": 1.0}, {0}),
        ({"top_k": 3, "top_p": 0.7}, {0, 1}),  # renormalized after top-k: .588 .235 .176
        ({"top_k": 3, "top_p": 0.9}, {0, 1, 2}),
        ({"top_p": 0.9, "min_p": 0.35}, {0, 1}),
        ({"temperature": 0.5, "top_p": 0.8}, {0, 1}),  # sharper: .69 .11 .06 .03 .01
    ],
)
def test_filter_table(kw: dict[str, Any], kept: set[int]) -> None:
    out = warp(PROBS.log().unsqueeze(0).clone(), [SamplingParams(**kw)])
    assert {i for i, v in enumerate(out[0].tolist()) if v != NEG} == kept


def test_top_k_keeps_ties_and_rows_are_independent() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    out = warp(logits.clone(), [SamplingParams(top_k=2), SamplingParams(top_k=0)])
    assert out[0].tolist() == [1.0, 1.0, 1.0, NEG]
    assert out[1].tolist() == logits[1].tolist()


def _hf_chain(scores: torch.Tensor, ids: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    lp = pytest.importorskip("transformers.generation.logits_process")
    procs: list[Any] = []
    if p.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    procs.append(lp.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(lp.TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        procs.append(lp.TopPLogitsWarper(p.top_p))
    if p.min_p:
        procs.append(lp.MinPLogitsWarper(p.min_p))
    for proc in procs:
        scores = proc(ids, scores)
    return scores


def test_filters_equal_transformers_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    rows = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3),
        SamplingParams(temperature=1.3, min_p=0.05, repetition_penalty=0.8),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=0.9, top_k=5, min_p=0.2),
        SamplingParams(temperature=2.0),
    ]
    logits = torch.randn(len(rows), 200, generator=g) * 3
    history = [torch.randint(0, 200, (30,), generator=g) for _ in rows]
    ours = logits.clone()
    for i, p in enumerate(rows):
        if p.repetition_penalty != 1.0:
            apply_repetition_penalty(ours, i, p.repetition_penalty, history[i])
    ours = warp(ours, rows)
    for i, p in enumerate(rows):
        ref = _hf_chain(logits[i : i + 1].clone(), history[i].unsqueeze(0), p)[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), i
        finite = torch.isfinite(ref)
        torch.testing.assert_close(ours[i][finite], ref[finite])


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    p = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler().sample(logits, [p], history=[[0, 0, 2]]).tolist() == [1]  # 2.0/1.2 < 1.9
    assert Sampler().sample(logits, [p], history=[[]]).tolist() == [0]
    with pytest.raises(ValueError, match="history"):
        Sampler().sample(logits, [p])


def _run(params: list[SamplingParams], seeds: list[int], steps: int, row: int) -> list[int]:
    gens = [make_generator(s) for s in seeds]
    g = torch.Generator().manual_seed(99)
    out = []
    for _ in range(steps):
        logits = torch.randn(len(params), 64, generator=g)
        logits[row] = torch.linspace(-2, 2, 64)  # the row under test always sees the same logits
        out.append(int(Sampler().sample(logits, params, gens, [[1, 2]] * len(params))[row]))
    return out


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    alone = _run([p], [123], 40, 0)
    assert alone == _run([p], [123], 40, 0)
    assert len(set(alone)) > 5  # really sampling
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, repetition_penalty=1.5), p]
    assert _run(others, [1, 2, 123], 40, 2) == alone
    assert _run([p], [124], 40, 0) != alone


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"temperature": 1.0}, [0.4, 0.3, 0.2, 0.1, 0.0]),
        ({"temperature": 0.5}, [16 / 30, 9 / 30, 4 / 30, 1 / 30, 0.0]),  # p^2 renormalized
        ({"temperature": 1.0, "top_k": 2}, [4 / 7, 3 / 7, 0.0, 0.0, 0.0]),
    ],
)
def test_sample_distribution(kw: dict[str, Any], expected: list[float]) -> None:
    n = 20_000
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0]).log().expand(n, 5)
    gen = make_generator(7)
    out = Sampler().sample(logits, [SamplingParams(**kw)] * n, [gen] * n)
    counts = torch.bincount(out, minlength=5).tolist()
    assert counts[4] == 0  # zero probability is never drawn
    chi2 = sum((c - n * e) ** 2 / (n * e) for c, e in zip(counts, expected, strict=True) if e > 0)
    dof = sum(e > 0 for e in expected) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (counts, chi2)


# --- stop conditions -------------------------------------------------------------------------


def _feed(checker: StopChecker, items: list[tuple[int, str]]) -> tuple[str, str | None, int]:
    shown = ""
    for tid, piece in items:
        r = checker.update(tid, piece)
        shown += r.text
        if r.finish_reason:
            return shown, r.finish_reason, checker.num_tokens
    return shown, None, checker.num_tokens


@pytest.mark.parametrize(
    ("kw", "pieces", "shown", "reason", "n"),
    [
        ({}, ["Hel", "lo"], "Hello", None, 2),
        ({"stop": ("END",)}, ["abc E", "N", "D tail"], "abc ", "stop", 3),
        ({"stop": ("END",)}, ["abc E", "N", "x"], "abc ENx", None, 3),  # a false start is released
        ({"stop": ("END", "bc")}, ["abc END"], "a", "stop", 1),  # earliest stop string wins
        ({"stop": ("\n\n",)}, ["one\n", "\ntwo"], "one", "stop", 2),
        ({"max_tokens": 2}, ["a", "b", "c"], "ab", "length", 2),
        ({"max_tokens": 2, "stop": ("xyz",)}, ["a", "bxy"], "abxy", "length", 2),  # held text flushed
        ({"max_tokens": 2, "stop": ("bc",)}, ["a", "bcd"], "a", "stop", 2),
    ],
)
def test_stop_strings_table(
    kw: dict[str, Any], pieces: list[str], shown: str, reason: str | None, n: int
) -> None:
    checker = StopChecker(SamplingParams(**kw), eos_ids={0})
    items = [(10 + i, p) for i, p in enumerate(pieces)]
    assert _feed(checker, items) == (shown, reason, n)
    assert checker.text == shown


def test_stop_token_ids_and_eos() -> None:
    assert _feed(StopChecker(SamplingParams(), eos_ids={0}), [(5, "a"), (0, ""), (6, "b")]) == (
        "a",
        "stop",
        2,
    )
    ignore = StopChecker(SamplingParams(ignore_eos=True, stop_token_ids=(7,)), eos_ids={0})
    assert _feed(ignore, [(0, "x"), (7, "STOP"), (6, "b")]) == ("x", "stop", 2)
    held = StopChecker(SamplingParams(stop=("ab",)), eos_ids={0})
    assert _feed(held, [(5, "xa"), (0, "")]) == ("xa", "stop", 2)  # held "a" comes out at EOS
    with pytest.raises(RuntimeError):
        held.update(5, "more")


def test_stop_checker_with_real_decoder(tiny_model_dir: MakeTiny) -> None:
    tok = Tokenizer.from_dir(tiny_model_dir("llama"))
    text = "The café said: Grüße 😀 STOP-HERE and more"
    ids = tok.encode(text, add_special_tokens=False)
    checker = StopChecker(SamplingParams(stop=("STOP-HERE",)), tok.eos_ids, tok.stream_decoder())
    shown = "".join(checker.update(i).text for i in ids if checker.finish_reason is None)
    assert shown == "The café said: Grüße 😀 "
    assert checker.finish_reason == "stop"
    # max_tokens in the middle of an emoji: the partial bytes come out as U+FFFD, like decode().
    cut = tok.encode("ab 😀", add_special_tokens=False)
    short = StopChecker(SamplingParams(max_tokens=len(cut) - 1), tok.eos_ids, tok.stream_decoder())
    shown = "".join(short.update(i).text for i in cut[:-1])
    assert shown == tok.decode(cut[:-1]) and short.finish_reason == "length"
