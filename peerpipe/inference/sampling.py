"""The one way a caller's sampling choices become the wire's ``Sampling`` record: CLI flags,
Python keyword arguments and the API's parsed fields all pass through ``sampling_from``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from peerpipe.engine.errors import InvalidSamplingParams  # no torch: clients import this
from peerpipe.protocol import Sampling, ValidationError

FIELDS = tuple(f.name for f in dataclasses.fields(Sampling))


def sampling_from(values: Mapping[str, Any], *, strict: bool = False) -> Sampling:
    """The ``Sampling`` fields found in ``values``; others are ignored (``vars(args)`` works) unless
    ``strict``. ``InvalidSamplingParams`` names a value or a name the record refuses."""
    unknown = sorted(set(values) - set(FIELDS))
    if strict and unknown:
        raise InvalidSamplingParams(f"unknown sampling option(s) {', '.join(unknown)}; use {', '.join(FIELDS)}")
    picked = {name: values[name] for name in FIELDS if name in values}
    if isinstance(picked.get("stop"), list | str):
        stop = picked["stop"]
        picked["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        return Sampling(**picked)
    except ValidationError as exc:
        raise InvalidSamplingParams(str(exc)) from None
