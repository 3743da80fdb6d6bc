"""Field checks shared by messages and records.

Each helper takes the frozen instance and a field name, so the ``ValidationError`` can say which
class and field were wrong.
"""

from __future__ import annotations

import math

from peerpipe.protocol.errors import ValidationError

MAX_ID_LEN = 128
MAX_NAME_LEN = 256
MAX_TEXT_LEN = 4096
U64_MAX = (1 << 64) - 1


def _where(obj: object, name: str) -> str:
    return f"{type(obj).__name__}.{name}"


def check_id(where: str, value: object) -> None:
    if type(value) is not str or not value:
        raise ValidationError(f"{where} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LEN:
        raise ValidationError(f"{where} is longer than {MAX_ID_LEN} characters")


def need_id(obj: object, name: str) -> None:
    check_id(_where(obj, name), getattr(obj, name))


def need_str(obj: object, name: str, max_len: int = MAX_TEXT_LEN) -> None:
    value = getattr(obj, name)
    if type(value) is not str:
        raise ValidationError(f"{_where(obj, name)} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValidationError(f"{_where(obj, name)} is longer than {max_len} characters")


def need_int(obj: object, name: str, lo: int = 0, hi: int = U64_MAX) -> None:
    value = getattr(obj, name)
    if type(value) is not int:
        raise ValidationError(f"{_where(obj, name)} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValidationError(f"{_where(obj, name)} must be in [{lo}, {hi}], got {value}")


def need_float(obj: object, name: str, lo: float = 0.0, hi: float = math.inf) -> None:
    """Check a float field; an int is accepted and stored as float so the field never lies."""
    value = getattr(obj, name)
    if type(value) is int and abs(value) < 1 << 1000:
        value = float(value)
        object.__setattr__(obj, name, value)
    if type(value) is not float:
        raise ValidationError(f"{_where(obj, name)} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValidationError(f"{_where(obj, name)} must be a finite number in [{lo}, {hi}], got {value}")


def need_bool(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if type(value) is not bool:
        raise ValidationError(f"{_where(obj, name)} must be a bool, got {type(value).__name__}")


def need_choice(obj: object, name: str, choices: frozenset[str]) -> None:
    value = getattr(obj, name)
    if type(value) is not str or value not in choices:
        raise ValidationError(f"{_where(obj, name)} must be one of {sorted(choices)}, got {value!r}")


def need_tuple_of(obj: object, name: str, cls: type, max_len: int) -> None:
    """Check a tuple-of-records field; a list is accepted and stored as a tuple."""
    value = getattr(obj, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(obj, name, value)
    if not isinstance(value, tuple):
        raise ValidationError(f"{_where(obj, name)} must be a tuple, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValidationError(f"{_where(obj, name)} has more than {max_len} items")
    for item in value:
        if not isinstance(item, cls):
            raise ValidationError(f"{_where(obj, name)} items must be {cls.__name__}, got {item!r}")


def need_instance(obj: object, name: str, cls: type, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if not isinstance(value, cls):
        raise ValidationError(f"{_where(obj, name)} must be {cls.__name__}, got {type(value).__name__}")


def need_ranks(obj: object, name: str, ranks: tuple[int, ...]) -> None:
    """A tensor field (``TensorData``) of one of these ranks."""
    value = getattr(obj, name)
    if len(value.shape) not in ranks:
        raise ValidationError(f"{_where(obj, name)} must have {' or '.join(map(str, ranks))} dimensions, got shape {value.shape}")


MAX_DIMS = 8
# Any single dimension beyond this is a corrupt or hostile header, whatever the byte limits say.
MAX_DIM = 1 << 40
