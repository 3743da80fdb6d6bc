"""The ``peerpipe`` command: parses arguments and hands each subcommand to its own module.

Every error peerpipe raises on purpose becomes one line on stderr and a non-zero exit; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import MutableMapping, Sequence

from peerpipe import __version__
from peerpipe.cli.args import BadValue
from peerpipe.errors import PeerpipeError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from peerpipe.cli import cluster_cmds, demo_cmd, doctor_cmd, generate_cmd, models_cmd, room_cmds

    parser = argparse.ArgumentParser(
        prog="peerpipe",
        description="Pool the GPUs and CPUs of machines on your network and run one LLM across them.",
    )
    parser.add_argument("--version", action="version", version=f"peerpipe {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: info, -vv: debug), as JSON lines on stderr",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_cmd.add_parser(sub)
    generate_cmd.add_parser(sub)
    room_cmds.add_host_parser(sub)
    room_cmds.add_join_parser(sub)
    cluster_cmds.add_status_parser(sub)
    cluster_cmds.add_plan_parser(sub)
    cluster_cmds.add_bench_parser(sub)
    doctor_cmd.add_parser(sub)
    models_cmd.add_parser(sub)
    for command in sub.choices.values():
        # `peerpipe status -v` as well as `peerpipe -v status`; SUPPRESS keeps the first's count
        # when the command itself has no -v.
        command.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more (-v: info, -vv: debug)"
        )
    return parser


def setup_logging(verbosity: int) -> None:
    from peerpipe.logs import configure

    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    configure(level)


def emulate_links() -> None:
    """Tests and benchmarks slow this process's links with PEERPIPE_LINK_DELAY_MS; imported only
    then, so every command's start stays light."""
    if os.environ.get("PEERPIPE_LINK_DELAY_MS"):
        from peerpipe.transport.emulation import delay_from_environment

        try:
            delay_from_environment()
        except ValueError as exc:
            raise PeerpipeError(str(exc)) from None


# OpenMP's idle threads spin before they sleep: libgomp (PyTorch's on Linux) about 300,000 pauses
# after every parallel region, 10-20 ms of a core on the 2-core VM; LLVM's and Intel's runtimes
# 200 ms. Alone on a machine that costs nothing, but nodes sharing one (peerpipe demo, bench rooms,
# one process a GPU) take each other's cores after every step: two 2-thread stages of the 75M
# shape answered at 0.74x one node with the default spin, 0.87-0.89x with 2000 pauses (about 0.1
# ms), and three such stages 16 answers at once at 16 tok/s against 58 (docs/inference.md). A node
# alone measured the same either way. The user's own settings win.
OPENMP_SPIN = {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "1"}


def quiet_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """Shorten OpenMP's idle spin (``OPENMP_SPIN``) unless ``environ`` says how to wait already.
    Runtimes read it once, as torch loads them: call it before anything imports torch."""
    if "OMP_WAIT_POLICY" in environ:
        return
    for name, value in OPENMP_SPIN.items():
        environ.setdefault(name, value)


def main(argv: Sequence[str] | None = None) -> int:
    quiet_openmp()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except PeerpipeError as exc:  # (a value that parses, naming what is not there: args.model_path)
        print(f"peerpipe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    setup_logging(args.verbose)
    try:
        emulate_links()
        return int(args.func(args) or 0)
    except PeerpipeError as exc:
        print(f"peerpipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, BadValue) else EXIT_ERROR
    except KeyboardInterrupt:
        print("peerpipe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
