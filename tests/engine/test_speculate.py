"""Speculation's parts without a network: the verifier's rule, prompt lookup, the draft size,
and the draft model kept in step with an answer."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.devtools.tiny_model import TOKENIZER_VOCAB_SIZE
from peerpipe.engine.draft_model import DraftModel, DraftModelError, check_draft_dir
from peerpipe.engine.generate import LocalEngine
from peerpipe.engine.loader import load_stage
from peerpipe.engine.sampling import Sampler, SamplingParams
from peerpipe.engine.speculate import (
    PROBE_EVERY,
    Drafts,
    DraftSize,
    NgramDrafter,
    SpeculationError,
    StepCosts,
    accepted_tokens,
    check_max_draft,
    check_mode,
    expected_tokens,
    verify,
)
from peerpipe.engine.tokenizer import Tokenizer
from peerpipe.models import default_draft_dir, default_model_dir

GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize(
    ("picks", "drafts", "kept"),
    [
        ([5], [], [5]),  # no drafts: the model's own token
        ([1, 2, 3], [1, 2], [1, 2, 3]),  # every draft kept, and one more
        ([1, 9, 3], [1, 2], [1, 9]),  # the second draft is wrong: the model's token there
        ([7, 2, 3], [1, 2], [7]),  # the first is wrong: later agreement does not count
        ([4, 4, 4, 4], [4, 4, 4], [4, 4, 4, 4]),
    ],
)
def test_the_model_keeps_the_drafts_up_to_its_first_disagreement(picks, drafts, kept) -> None:
    assert accepted_tokens(picks, drafts) == kept


def test_a_verification_needs_one_pick_more_than_drafts() -> None:
    with pytest.raises(ValueError, match="one more"):
        accepted_tokens([1, 2], [1, 2])


@pytest.mark.parametrize("bad", ["fast", "", "NGRAM"])
def test_unknown_modes_are_refused_by_name(bad: str) -> None:
    with pytest.raises(SpeculationError, match="off, ngram, draft"):
        check_mode(bad)


@pytest.mark.parametrize("bad", [0, -1, 65, True, 2.0])
def test_draft_sizes_out_of_range_are_refused(bad) -> None:
    with pytest.raises(SpeculationError, match="speculate-max"):
        check_max_draft(bad)


# -- prompt lookup --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "k", "drafts"),
    [
        ([1, 2, 3, 4, 5, 1, 2], 3, [3, 4, 5]),  # the text repeats: copy what followed
        ([1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3], 2, [8, 1]),  # the latest occurrence wins
        ([5, 1, 2, 7, 3, 1, 2, 6, 9, 1, 2], 1, [6]),
        ([1, 2, 3, 4], 4, []),  # nothing repeats
        ([7, 7], 3, []),  # too short for the smallest n-gram to have occurred before
        ([1, 2, 3, 1, 2], 10, [3, 1, 2]),  # a match near the end drafts what there is
    ],
)
def test_prompt_lookup_drafts_what_followed_the_last_tokens_before(history, k, drafts) -> None:
    assert NgramDrafter().propose(history, k) == drafts


def test_the_longest_matching_ngram_wins_over_a_later_shorter_one() -> None:
    # [.. 4 1 2] occurs once with 3 after it; [1 2] alone occurs later with 9 after it.
    history = [4, 1, 2, 3, 0, 1, 2, 9, 5, 4, 1, 2]
    assert NgramDrafter(max_n=3, min_n=2).propose(history, 1) == [3]
    assert NgramDrafter(max_n=2, min_n=2).propose(history, 1) == [9]


def _reference(history: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if len(history) <= n:
            continue
        tail = history[-n:]
        for end in range(len(history) - 1, n - 1, -1):
            if history[end - n : end] == tail:
                return history[end : end + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=40), st.integers(1, 6), st.integers(1, 8))
def test_prompt_lookup_grown_token_by_token_equals_a_plain_search(history, min_n, k) -> None:
    max_n = min_n + 2
    drafter = NgramDrafter(max_n=max_n, min_n=min_n)
    for end in range(len(history) + 1):  # as an answer grows
        assert drafter.propose(history[:end], k) == _reference(history[:end], k, max_n, min_n)


def test_prompt_lookup_starts_afresh_on_another_history() -> None:
    drafter = NgramDrafter()
    assert drafter.propose([1, 2, 3, 1, 2], 1) == [3]
    assert drafter.propose([1, 2, 4, 1, 2], 1) == [4]


# -- the draft size -------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.0, 0.3, 0.8, 1.0])
def test_expected_tokens_per_step_matches_a_simulation(a: float) -> None:
    rng = random.Random(1)
    k, trials, total = 4, 20000, 0
    for _ in range(trials):
        kept = 0
        while kept < k and rng.random() < a:
            kept += 1
        total += kept + 1
    assert expected_tokens(a, k) == pytest.approx(total / trials, rel=0.02)


def _sized(seconds: dict[int, float], acceptance: float, max_k: int = 8) -> DraftSize:
    size = DraftSize(StepCosts(dict(seconds)), max_k)
    size.acceptance = acceptance
    return size


def test_the_first_steps_measure_a_plain_step_then_the_largest() -> None:
    costs = StepCosts()
    size = DraftSize(costs, 6)
    assert size.choose() == 0
    costs.record(0, 0.5)  # a size's first step captures graphs on a GPU: not counted
    assert size.choose() == 0
    costs.record(0, 0.02)
    assert size.choose() == 6
    costs.record(6, 0.9)
    assert size.choose() == 6
    costs.record(6, 0.021)
    assert 3 <= size.choose() <= 6  # hops dominate and half the drafts are kept: drafting pays


def test_a_sizes_cost_is_the_median_of_its_recent_steps() -> None:
    costs = StepCosts()
    for t in (9.0, 0.010, 0.011, 0.5, 0.012, 0.013, 0.014):
        costs.record(2, t)
    assert costs.seconds[2] == 0.013  # the last five: 0.011, 0.5, 0.012, 0.013, 0.014


@pytest.mark.parametrize(
    ("seconds", "acceptance", "k"),
    [
        ({0: 0.020, 8: 0.021}, 0.9, 8),  # a slow link, a good drafter: the most
        ({0: 0.020, 8: 0.021}, 0.01, 0),  # a drafter that is almost never right: none
        ({0: 0.001, 8: 0.009}, 0.5, 0),  # no link, compute bound: not worth it at 0.5
        ({0: 0.001, 8: 0.004}, 0.99, 8),  # ...but drafts that are nearly always right are
        ({0: 0.010, 8: 0.030}, 0.6, 2),  # in between: a few
    ],
)
def test_the_draft_size_maximises_expected_tokens_per_second(seconds, acceptance, k) -> None:
    size = _sized(seconds, acceptance)
    assert size.choose() == k
    rates = {j: expected_tokens(acceptance, j) / size.costs.estimate(j) for j in range(9)}
    assert rates[k] >= max(rates.values()) / 1.02


def test_a_room_where_drafting_does_not_pay_still_re_measures_now_and_then() -> None:
    size = _sized({0: 0.001, 8: 0.009}, 0.3)
    choices = [size.choose() for _ in range(PROBE_EVERY + 1)]
    assert choices[:-1] == [0] * PROBE_EVERY and choices[-1] == 8


def test_a_fixed_size_always_drafts_the_most() -> None:
    size = DraftSize(StepCosts({0: 0.001, 8: 0.5}), 8, prior=0.0, fixed=True)
    assert [size.choose() for _ in range(3)] == [8, 8, 8]


def test_acceptance_follows_what_the_verifier_keeps() -> None:
    size = _sized({}, 0.5)
    for _ in range(40):
        size.observe(4, 4)
    assert size.acceptance > 0.95
    for _ in range(40):
        size.observe(4, 0)
    assert size.acceptance < 0.05


def test_step_costs_between_measured_sizes_lie_on_a_line() -> None:
    costs = StepCosts({0: 0.010, 8: 0.018})
    assert costs.estimate(4) == pytest.approx(0.014)
    assert StepCosts({0: 0.01}).estimate(3) is None


# -- verification draws as an undrafted step would ----------------------------------------------


def test_sampled_verification_keeps_the_models_distribution() -> None:
    """Two tokens after a fixed prefix, drawn unseeded with a draft from another distribution,
    against the exact joint law p(t1) p(t2 | t1): a chi-square test on 36 cells."""
    torch.manual_seed(0)
    vocab = 6
    p1 = torch.randn(vocab) * 1.5  # logits after the prefix
    p2 = torch.randn(vocab, vocab) * 1.5  # logits after the prefix and t1
    q = torch.softmax(torch.randn(vocab), -1)  # the drafter's (wrong) law for t1
    params = SamplingParams(temperature=1.0)
    sampler, gen = Sampler(), torch.Generator().manual_seed(5)
    counts = torch.zeros(vocab, vocab)
    draws = 6000
    for _ in range(draws):
        d = int(torch.multinomial(q, 1, generator=gen))
        rows = torch.stack([p1, p2[d]])
        kept = verify(sampler, rows, params, gen, [], [d], 10)
        if len(kept) == 1:  # the draft was refused: one more plain step for t2
            t2 = int(sampler.sample(p2[kept[0]].unsqueeze(0).clone(), [params], [gen], [[]], [11])[0])
            kept.append(t2)
        counts[kept[0], kept[1]] += 1
    exact = torch.softmax(p1, -1).unsqueeze(1) * torch.softmax(p2, -1)
    expected = exact * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 35 degrees of freedom: the 0.1% critical value is 66.6.
    assert chi2 < 66.6, chi2


def test_seeded_verification_picks_what_plain_steps_pick() -> None:
    torch.manual_seed(1)
    rows = torch.randn(4, 50)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    sampler = Sampler()
    plain = [int(sampler.sample(rows[j : j + 1].clone(), [params], [torch.Generator()], [[]], [20 + j])[0]) for j in range(4)]
    assert verify(sampler, rows, params, torch.Generator(), [], plain[:3], 20) == plain
    wrong = [plain[0], (plain[1] + 1) % 50, plain[2]]
    assert verify(sampler, rows, params, torch.Generator(), [], wrong, 20) == plain[:2]


# -- the draft model ------------------------------------------------------------------------


def test_the_bundled_draft_shares_the_bundled_models_tokenizer_and_is_small() -> None:
    check_draft_dir(default_draft_dir(), default_model_dir())
    size = sum(f.stat().st_size for f in default_draft_dir().iterdir())
    assert size <= 5 * 2**20, size


def test_a_draft_with_another_tokenizer_is_refused(tiny_model_dir) -> None:
    with pytest.raises(DraftModelError, match="another tokenizer"):
        check_draft_dir(tiny_model_dir("llama"), default_model_dir())


def test_a_draft_session_drafts_its_models_greedy_continuation_and_follows_rollbacks(tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)

    def greedy(prompt: list[int], n: int) -> list[int]:
        return engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)).tokens

    draft = DraftModel(load_stage(model, dtype="float32")[0], sessions=2, max_seq=64, vocab_limit=10**9)
    session = draft.session(GREEDY)
    prompt = [5, 17, 42, 99, 3]
    first = session.propose(prompt, 4)
    assert first == greedy(prompt, 4)
    # The verifier kept two drafts and chose another token: the draft rolls back and goes on.
    other = (first[2] + 1) % 100
    history = prompt + first[:2] + [other]
    assert session.propose(history, 5) == greedy(history, 5)
    assert draft.cache.lengths[session.slot] == len(history) + 4  # the last draft is not fed yet
    session.close()
    assert draft.cache.free_slots == 2


def test_a_draft_session_draws_sampled_drafts_with_the_verifiers_noise(tiny_model_dir) -> None:
    """A draft that is the model itself, seeded: every draft equals the model's own pick."""
    model = tiny_model_dir("llama")
    params = SamplingParams(temperature=0.8, seed=9, max_tokens=6, ignore_eos=True)
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    prompt = [5, 17, 42]
    expected = engine.generate(prompt, params).tokens
    draft = DraftModel(load_stage(model, dtype="float32")[0], sessions=1, max_seq=64, vocab_limit=10**9)
    assert draft.session(params).propose(prompt, 6) == expected


def test_every_draft_slot_in_use_is_a_typed_error(tiny_model_dir) -> None:
    draft = DraftModel(load_stage(tiny_model_dir("llama"), dtype="float32")[0], sessions=1, max_seq=16, vocab_limit=100)
    draft.session(GREEDY)
    with pytest.raises(DraftModelError, match="in use"):
        draft.session(GREEDY)


def test_the_bundled_draft_agrees_with_the_bundled_model_often() -> None:
    """It was distilled from it (docs/default-model.md): greedy drafts on Austen's prose are kept
    more often than not."""
    target, _ = LocalEngine.from_dir(default_model_dir(), device="cpu", dtype="float32", max_seq=256)
    tokenizer = Tokenizer.from_dir(default_model_dir())
    draft = DraftModel.load(
        default_draft_dir(), tokenizer, vocab_limit=4096, sessions=1, max_seq=256, device="cpu", dtype="float32"
    )
    prompt = tokenizer.encode("It was a fine morning in April, and Emma")
    answer = target.generate(prompt, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)).tokens
    session = draft.session(GREEDY)
    agree = sum(session.propose(prompt + answer[:i], 1) == [answer[i]] for i in range(len(answer)))
    assert agree / len(answer) > 0.5, agree


# -- the local engine drafts too --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ngram", "draft"])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3),
    ],
)
def test_the_local_engine_with_drafts_gives_the_same_tokens(tiny_model_dir, mode: str, params: SamplingParams) -> None:
    model = tiny_model_dir("llama")
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    prompt = [5, 17, 42, 99, 3, 5, 17]
    plain = engine.generate(prompt, params)
    size = DraftSize(StepCosts(), 6, fixed=True)
    if mode == "ngram":
        drafter = NgramDrafter()
    else:  # the model drafts for itself: every draft is kept
        drafter = DraftModel(load_stage(model, dtype="float32")[0], sessions=1, max_seq=64, vocab_limit=10**9).session(params)
    result = engine.generate(prompt, params, drafts=Drafts(mode, drafter, size))
    assert result.tokens == plain.tokens and result.text == plain.text and result.finish_reason == plain.finish_reason
    spec = result.speculation
    assert spec is not None and spec.steps + spec.accepted == spec.tokens == len(plain.tokens) - 1
    if mode == "draft" and params.stop == ():
        assert spec.accepted == spec.drafted > 0
    assert engine.cache.free_slots == engine.cache.max_slots


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_tokens_after_a_stop_inside_a_kept_block_are_not_counted(tiny_model_dir, mode: str) -> None:
    """The model drafts for itself, six a step: a stop string at the 11th token lies inside the
    second block, whose last tokens the answer never has."""
    model = tiny_model_dir("llama")
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    prompt = [5, 17, 42, 99, 3, 5, 17]
    full = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    stop = engine.tokenizer.decode(full.tokens[:11])[len(engine.tokenizer.decode(full.tokens[:10])) :]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,))
    plain = engine.generate(prompt, params)
    assert plain.finish_reason == "stop" and len(plain.tokens) < 30
    drafter = (
        NgramDrafter() if mode == "ngram"
        else DraftModel(load_stage(model, dtype="float32")[0], sessions=1, max_seq=64, vocab_limit=10**9).session(params)
    )
    result = engine.generate(prompt, params, drafts=Drafts(mode, drafter, DraftSize(StepCosts(), 6, fixed=True)))
    spec = result.speculation
    assert result.tokens == plain.tokens and spec is not None
    assert spec.tokens == spec.steps + spec.accepted == len(plain.tokens) - 1, spec


def test_a_draft_with_fewer_embedding_rows_drafts_nothing_past_them(tiny_model_dir) -> None:
    """Models of one tokenizer may pad their embeddings to other sizes: an id the draft has no
    row for means no drafts, never a failed answer."""
    model = tiny_model_dir("llama")
    engine, _ = LocalEngine.from_dir(model, device="cpu", dtype="float32", max_seq=64)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    inside = [5, 17, 42, 99]
    rows = max(inside + engine.generate(inside, params).tokens) + 1  # every id of this answer has a row
    assert rows < TOKENIZER_VOCAB_SIZE
    small = tiny_model_dir("llama", seed=3, config_overrides={"num_hidden_layers": 1, "vocab_size": rows})
    check_draft_dir(small, model)  # one tokenizer: the pair is allowed
    for prompt, drafts in (([5, 17, rows, 99], False), (inside, True)):
        draft = DraftModel(load_stage(small, dtype="float32")[0], sessions=1, max_seq=64, vocab_limit=rows)
        result = engine.generate(prompt, params, drafts=Drafts("draft", draft.session(params), DraftSize(StepCosts(), 4, fixed=True)))
        assert result.tokens == engine.generate(prompt, params).tokens
        assert result.speculation is not None and (result.speculation.drafted > 0) == drafts


def test_a_drafter_that_fails_stops_drafting_not_the_answer(tiny_model_dir, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:  # a model drafter whose device failed
        def propose(self, history, k):  # type: ignore[no-untyped-def]
            raise RuntimeError("CUDA error: an illegal memory access")

        def close(self) -> None:
            pass

    engine, _ = LocalEngine.from_dir(tiny_model_dir("llama"), device="cpu", dtype="float32", max_seq=64)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    drafts = Drafts("draft", Broken(), DraftSize(StepCosts(), 4, fixed=True))
    with caplog.at_level("WARNING"):
        result = engine.generate([5, 17, 42, 5, 17], params, drafts=drafts)
    assert result.tokens == engine.generate([5, 17, 42, 5, 17], params).tokens
    assert result.speculation is not None and result.speculation.drafted == 0
    assert [r.message for r in caplog.records].count(
        "drafting stopped for this answer: RuntimeError: CUDA error: an illegal memory access"
    ) == 1
