"""The command line documents itself: every option has help, the README's command summaries list
every option, and its examples ask the model the demo serves."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from peerpipe.cli.main import build_parser
from peerpipe.models import BUNDLED

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
SKIP = {"--help", "--verbose"}


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    return [
        next(o for o in a.option_strings if o.startswith("--"))
        for a in parser._actions
        if any(o.startswith("--") for o in a.option_strings) and not SKIP & set(a.option_strings)
    ]


def summary(command: str) -> str:
    """The README's synopsis lines for ``peerpipe COMMAND``, continuation lines included."""
    text = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        taking = False
        for line in block.splitlines():
            if line.startswith("peerpipe "):
                taking = line.startswith(f"peerpipe {command} ") or line == f"peerpipe {command}"
            elif not line.startswith(" "):
                taking = False
            if taking:
                text.append(line)
    return "\n".join(text)


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_has_help(command: str) -> None:
    parser = commands()[command]
    bare = [a.option_strings or [a.dest] for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not bare, f"peerpipe {command}: no help text for {bare}"


@pytest.mark.parametrize("command", sorted(commands()))
def test_the_readme_summary_lists_every_option(command: str) -> None:
    text = summary(command)
    assert text, f"the README has no synopsis for peerpipe {command}"
    missing = [o for o in long_options(commands()[command]) if not re.search(re.escape(o) + r"\b", text)]
    assert not missing, f"the README's peerpipe {command} synopsis lacks {missing}"


def test_the_readme_examples_ask_the_model_the_demo_serves() -> None:
    asked = re.findall(r'model="([^"]+)"|"model": "([^"]+)"', README)
    assert asked and {a or b for a, b in asked} == {BUNDLED}


def test_the_walkthroughs_plan_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The real-model walk-through's "see what fits" step, on the bundled model."""
    from peerpipe.cli.main import main

    line = next(x.strip() for x in README.splitlines() if x.strip().startswith("peerpipe plan --model ~/models/llama --node"))
    argv = line.split()[1:]
    argv[argv.index("~/models/llama")] = BUNDLED
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pc" in out and "ms/token" in out, out
