from __future__ import annotations

import random

import pytest

from peerpipe.room import CodeFormatError, RoomCode, generate_code, parse_code
from peerpipe.room.words import WORDS


def test_word_list_is_256_short_distinct_lowercase_words() -> None:
    assert len(WORDS) == len(set(WORDS)) == 256
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 6 for w in WORDS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7-amber-falcon", "7-amber-falcon"),
        ("  7 Amber FALCON ", "7-amber-falcon"),
        ("7_amber--falcon", "7-amber-falcon"),
        ("007-amber-falcon", "7-amber-falcon"),
        ("42-purple-monkey-dish", "42-purple-monkey-dish"),  # chosen codes may use any words
    ],
)
def test_parse_normalises(text: str, expected: str) -> None:
    code = parse_code(text)
    assert str(code) == expected
    assert code.password == expected.encode()
    assert parse_code(str(code)) == code


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("amber-falcon", "starts with its room number"),
        ("7-amber", "1 word"),
        ("0-amber-falcon", "between 1 and"),
        ("10000-amber-falcon", "between 1 and"),
        ("7-amber-f4lcon", "not a valid code word"),
        ("7-a-falcon", "not a valid code word"),
        ("٧-amber-falcon", "room number"),
    ],
)
def test_parse_rejects_with_typed_error(text: str, fragment: str) -> None:
    with pytest.raises(CodeFormatError, match=fragment):
        parse_code(text)


def test_generate_uses_word_list_and_short_nameplate() -> None:
    rng = random.Random(1)
    for _ in range(200):
        code = generate_code(rng=rng)  # type: ignore[arg-type]
        assert 1 <= code.nameplate <= 99 and len(code.words) == 2 and code.uses_word_list
        assert parse_code(str(code)) == code
    assert generate_code(nameplate=5).nameplate == 5


def test_code_is_frozen_value() -> None:
    assert RoomCode(7, ("amber", "falcon")) == parse_code("7-amber-falcon")
    assert not RoomCode(7, ("purple", "falcon")).uses_word_list


def test_code_repr_hides_the_secret_words() -> None:
    code = parse_code("7-amber-falcon")
    assert "amber" not in repr(code) and "falcon" not in repr(code)
    assert str(code) == "7-amber-falcon"  # printing it on purpose still works


def test_absurdly_long_room_number_is_a_format_error() -> None:
    with pytest.raises(CodeFormatError, match="room number"):
        parse_code("1" * 5000 + "-amber-falcon")
