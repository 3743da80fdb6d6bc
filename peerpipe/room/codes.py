"""Room codes such as ``7-amber-falcon``: a public nameplate number plus secret words.

The nameplate is what mDNS advertises so a joiner can find the right host; the whole
normalised code (nameplate included) is the PAKE password, so the words never leave
the machine in any form an eavesdropper could test offline.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from peerpipe.room.errors import CodeFormatError
from peerpipe.room.words import WORDS

MAX_NAMEPLATE = 9999
MIN_WORDS = 2
MAX_WORDS = 6
_WORD_RE = re.compile(r"[a-z]{2,16}")
_SEPARATORS_RE = re.compile(r"[\s_\-]+")
_WORD_SET = frozenset(WORDS)


@dataclass(frozen=True)
class RoomCode:
    nameplate: int
    words: tuple[str, ...] = field(repr=False)  # the secret: never in logs or reprs

    def __post_init__(self) -> None:
        if not 1 <= self.nameplate <= MAX_NAMEPLATE:
            raise CodeFormatError(
                f"the room number must be between 1 and {MAX_NAMEPLATE}, not {self.nameplate}"
            )
        if not MIN_WORDS <= len(self.words) <= MAX_WORDS:
            raise CodeFormatError(
                f"a room code has a number and {MIN_WORDS} to {MAX_WORDS} words "
                f"(like 7-amber-falcon), this one has {len(self.words)} word(s)"
            )
        for word in self.words:
            if not _WORD_RE.fullmatch(word):
                raise CodeFormatError(
                    f"{word!r} is not a valid code word: use 2 to 16 letters a-z (like 7-amber-falcon)"
                )

    def __str__(self) -> str:
        return "-".join([str(self.nameplate), *self.words])

    @property
    def password(self) -> bytes:
        """The PAKE password: the whole normalised code."""
        return str(self).encode("ascii")

    @property
    def uses_word_list(self) -> bool:
        """True when every word comes from the built-in list (always so for generated codes)."""
        return all(word in _WORD_SET for word in self.words)


def parse_code(text: str) -> RoomCode:
    """Parse and normalise a code typed by a user: case, spaces and underscores are forgiven.

    ``" 7 Amber_FALCON "`` -> ``RoomCode(7, ("amber", "falcon"))``.
    """
    parts = [p for p in _SEPARATORS_RE.split(text.strip().lower()) if p]
    if not parts:
        raise CodeFormatError("the room code is empty: it looks like 7-amber-falcon")
    head, words = parts[0], tuple(parts[1:])
    if not head.isdigit() or not head.isascii():
        raise CodeFormatError(
            f"a room code starts with its room number (like 7-amber-falcon), not {parts[0]!r}"
        )
    if len(head) > len(str(MAX_NAMEPLATE)):
        raise CodeFormatError(f"the room number must be between 1 and {MAX_NAMEPLATE}")
    return RoomCode(int(head), words)


def generate_code(nameplate: int | None = None, rng: secrets.SystemRandom | None = None) -> RoomCode:
    """A fresh code from the system CSPRNG; nameplates stay short (1-99) so they are easy to say."""
    rng = rng or secrets.SystemRandom()
    plate = nameplate if nameplate is not None else rng.randint(1, 99)
    return RoomCode(plate, (rng.choice(WORDS), rng.choice(WORDS)))
