"""``peerpipe demo``: see peerpipe work on this machine with nothing downloaded.

It opens a room of local nodes on 127.0.0.1 (mDNS bound to 127.0.0.1 too), the members join it by
code, the room measures them and splits the bundled model across them, one answer streams
through the pipeline, and then the host serves the OpenAI API and the dashboard until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from peerpipe.cli.args import MODEL_FORMS, add_speculation_arguments, model_path, positive_int
from peerpipe.cli.http_opts import add_http_arguments, reserve_http, start_api
from peerpipe.cli.room_cmds import check_draft, check_model
from peerpipe.cli.signals import Interrupts

DEMO_PROMPT = "It was a fine morning in April, and Emma"
LOOPBACK = "127.0.0.1"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run a room of local nodes with the bundled model and serve it", description=run.__doc__
    )
    p.add_argument("--nodes", type=positive_int, default=3, help="local nodes in the room (3)")
    p.add_argument("--model", type=model_path, metavar="MODEL", help=f"serve this model instead of the bundled one: {MODEL_FORMS}")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="the sample prompt")
    p.add_argument("--max-tokens", type=positive_int, default=60, help="length of the sample answer in tokens (60)")
    p.add_argument("--no-serve", action="store_true", help="exit after the sample answer")
    add_speculation_arguments(p)
    add_http_arguments(p)
    p.set_defaults(func=run)


def say(line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    """Start a room of local nodes with the bundled model, plan it, print the code, the dashboard's
    address and an answer to a sample prompt, then serve the API and the dashboard until Ctrl-C."""
    from peerpipe.cli.signals import run_command
    from peerpipe.models import bundled_draft_for, default_model_dir

    if args.model is None:
        args.model = default_model_dir()
    if args.draft is None and args.speculate in (None, "draft"):
        args.draft = bundled_draft_for(Path(args.model))  # the bundled model comes with its draft
    check_model(args.model)
    check_draft(args.model, args.draft, args.speculate)
    return run_command(lambda signals: _demo(args, signals))


async def _demo(args: argparse.Namespace, signals: Interrupts) -> int:
    from peerpipe.cli.generate_cmd import show_text
    from peerpipe.cli.room_registry import registered
    from peerpipe.cluster.config import ClusterConfig
    from peerpipe.cluster.rollout import describe_plan
    from peerpipe.models import default_model_dir
    from peerpipe.plan import Budget
    from peerpipe.python_api import create_room, join_room

    model = args.model
    # Co-located nodes are equals, so the optimal planner would keep every layer on one of them
    # (no hops beats any split); the demo splits evenly to show a real pipeline.
    config = ClusterConfig(
        expect_nodes=args.nodes, strategy="proportional", budget=Budget(context_tokens=1024, sessions=4)
    )
    began = time.monotonic()
    with contextlib.ExitStack() as reserved:
        http = None if args.no_serve else reserve_http(args, say, any_port_if_busy=True)
        if http is not None:
            reserved.callback(http.close)
        say(f"model: {model}")
        async with (
            create_room(
                model, listen=(LOOPBACK, 0), advertise=True, name="demo-host", config=config, quick=True,
                speculate=args.speculate, speculate_max=args.speculate_max, draft=args.draft,
            ) as room,
            contextlib.AsyncExitStack() as nodes,
        ):
            say(f"room code: {room.code}   (host on {room.address[0]}:{room.address[1]}, mDNS on {LOOPBACK} only)")
            # `peerpipe status` (and `plan`) then find the demo's room as they find a host's.
            reserved.enter_context(registered(str(room.code), f"{room.address[0]}:{room.address[1]}", "host"))
            for i in range(1, args.nodes):
                # Each member finds the host by the code alone, as `peerpipe join CODE` does on a LAN.
                await nodes.enter_async_context(
                    join_room(str(room.code), model=model, listen=LOOPBACK, name=f"demo-node-{i}", quick=True)
                )
                say(f"joined: demo-node-{i} (encrypted, authenticated by the code)")
            await room.wait_for_nodes(args.nodes)
            plan = await room.plan(fail_fast=True)
            say(describe_plan(plan, room.cluster.names()))
            say(f"room ready: {args.nodes} nodes, {time.monotonic() - began:.1f} s after start")
            api = await start_api(room, args, say, http)
            try:
                say(f"prompt: {args.prompt}")
                print("answer: ", end="", flush=True)
                # The model's own sampling defaults, with a fixed seed so the demo tells the same story.
                # The bundled model continues text; any other (an instruct model) is asked in its chat template.
                chat = Path(model).resolve() != default_model_dir().resolve()
                result = await room.generate(args.prompt, chat=chat, on_text=show_text, max_tokens=args.max_tokens, seed=7)
                print(flush=True)
                spec = result.speculation
                drafted = (
                    f"; {spec.acceptance:.0%} of the {'draft model' if spec.mode == 'draft' else spec.mode}'s drafts kept, "
                    f"{spec.tokens_per_step:.1f} tokens per step"
                    if spec is not None and spec.drafted else ""
                )
                say(
                    f"[{len(result.tokens)} tokens at {result.tok_s:.1f} tok/s through "
                    f"{len(plan.stages)} stages; first token after {result.prefill_s * 1e3:.0f} ms{drafted}]"
                )
                if api is None:
                    return 0
                say("serving the API and the dashboard; Ctrl-C stops the room")
                signals.serving()
                await signals.stop.wait()
                say("stopping")
            finally:
                if api is not None:
                    await api.close()
    return 0
