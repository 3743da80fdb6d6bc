"""Element types by the names that config files, plans and the wire use, and their sizes: the one
table every part reads."""

from __future__ import annotations

ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "bool": 1,
}
# What a model's weights may be held in on a stage.
WEIGHT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
