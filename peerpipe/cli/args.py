"""Argument types the commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from peerpipe.errors import PeerpipeError
from peerpipe.transport import Address

N = TypeVar("N", int, float)


class BadValue(PeerpipeError):
    """A value argparse took that the command refuses: exit 2, as argparse's own bad values."""


def parse_address(text: str, *, default_port: int | None = None) -> Address:
    """``HOST:PORT`` (or ``HOST`` when a default port is given) -> ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    host = host.strip("[]")
    if not port_text:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"{text!r} needs a port: HOST:PORT")
        return host, default_port
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port_text)


def interface_address(text: str) -> str:
    """``join --listen``: an address of this machine, with no port (a member listens on any free one)."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host and (host.count(":") == 0 or host.startswith("[")):
        raise argparse.ArgumentTypeError(f"{text!r}: give this machine's address alone ({host.strip('[]')}); a member picks its own port")
    return text


def _positive(convert: Callable[[str], N], kind: str, noun: str) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {noun}, got {text}")
        return value

    return parse


positive_int = _positive(int, "a whole number", "integer")
positive_float = _positive(float, "a number", "number")


# What every --model takes (models/resolve.py), for the help texts.
MODEL_FORMS = "a Hugging Face folder or Hub id (Qwen/Qwen3-0.6B), a .gguf file, ollama:NAME, or austen (bundled)"


def model_path(text: str) -> Path:
    """``--model``: a model folder, or the bundled model's name. One that is not there raises
    ``ModelNotFoundError`` through argparse (which would make it a bad value, exit 2, under the
    whole usage): ``main`` says it in one line, exit 1, as for a model that fails to load."""
    from peerpipe.models import resolve_model

    path = resolve_model(text)
    if Path(text).expanduser().exists():  # a folder or file of the user's: listed by `peerpipe models`
        from peerpipe.models.catalog import remember

        remember(path)
    return path


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """How the planner splits a model: shared by ``host`` and ``plan``."""
    parser.add_argument(
        "--strategy",
        choices=["optimal", "proportional"],
        default="optimal",
        help="optimal: the split the cost model predicts fastest, which may leave slow nodes out; "
        "proportional: every node gets layers in proportion to its speed (optimal)",
    )
    parser.add_argument(
        "--objective",
        choices=["latency", "throughput"],
        default="latency",
        help="latency: fastest single answer; throughput: most tokens per second with many answers at once (latency)",
    )


def draft_size(text: str) -> int:
    from peerpipe.engine.speculate import MAX_DRAFT_LIMIT

    if not text.isdigit() or not 1 <= int(text) <= MAX_DRAFT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to {MAX_DRAFT_LIMIT}")
    return int(text)


def add_speculation_arguments(parser: argparse.ArgumentParser, *, speculate_help: str = "") -> None:
    """How tokens are drafted for the model to verify in one pass: ``host`` and ``demo`` (for the
    room), ``generate`` (here, or a room's host's setting with ``--room``)."""
    from peerpipe.engine.speculate import DEFAULT_MAX_DRAFT

    parser.add_argument(
        "--speculate",
        choices=["off", "ngram", "draft"],
        default="" if speculate_help else None,
        help=speculate_help or "draft tokens for the stages to verify in one pass: ngram looks them up in the "
        "prompt and answer, draft runs the --draft model here (default: draft with --draft, else ngram)",
    )
    parser.add_argument(
        # None when not given: generate --room refuses it (the host's own setting drafts there).
        "--speculate-max", type=draft_size, default=None, metavar="K",
        help=f"most tokens one step drafts; fewer, or none, where drafting does not pay ({DEFAULT_MAX_DRAFT})",
    )
    parser.add_argument(
        "--draft", type=model_path, metavar="DIR",
        help="a small model with this model's tokenizer, run on this node to draft "
        "('austen-draft' for the bundled model)",
    )
