"""``peerpipe host`` and ``peerpipe join``: open a room, or join one by its code.

Output for people (and tests) goes to stdout, one flushed line per happening;
logs are structured and go to stderr, quiet unless asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from peerpipe.cli.args import (
    MODEL_FORMS,
    BadValue,
    add_speculation_arguments,
    add_strategy_arguments,
    interface_address,
    model_path,
    parse_address,
    positive_float,
    positive_int,
)
from peerpipe.cli.gpus import GpuChildren, GpuNode, add_gpus_argument, child_arguments, gpu_nodes, wildcard
from peerpipe.cli.signals import Interrupts, run_command
from peerpipe.errors import PeerpipeError
from peerpipe.room import PeerInfo, RoomCode, default_lan_ip, parse_code
from peerpipe.transport import Address

if TYPE_CHECKING:
    from peerpipe.python_api import Room


def say(line: str) -> None:
    print(line, flush=True)


def _listen_address(text: str) -> Address:
    return parse_address(text, default_port=0)


def _chunk(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a whole number of tokens (0 or more)")
    return int(text)


def _use_threads(args: argparse.Namespace) -> None:
    if args.threads is None:
        return
    from peerpipe.compute import set_threads

    try:
        set_threads(args.threads)
    except ValueError as exc:
        raise PeerpipeError(str(exc)) from None


def _replicas(text: str) -> int:
    if text == "auto":
        return 1
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of replicas (or auto)")
    return int(text)


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:N, mps, xpu or webgpu (default: the best one present)")
    add_gpus_argument(parser)
    parser.add_argument(
        "--memory", type=positive_float, metavar="GB", help="offer at most this much memory to the room (default: all free)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter, less precise device benchmarks")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8", "int4", "keep", "auto"],
        default="none",
        help="hold this node's layers' matrices in fewer bits, so it takes more layers: int8 (a scale per "
        "output channel; fast on CPUs) or int4 (groups of 64; a quarter of bf16's memory, slower); keep: a "
        "GGUF's matrices as precise as the file stores them (4-bit types in int4, 5- to 8-bit in int8); auto: "
        "the planner chooses, in full precision when the model fits so, else int8, else int4 (none)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for this node's tensor work (default: PyTorch's, one per core); give each node on "
        "one machine its share, or their thread pools fight",
    )


def add_host_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "host", help="open a room and print its code", description=host_cmd.__doc__
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        metavar="HOST[:PORT]",
        help="address to accept members on; mDNS runs on that interface only "
        "(default: this machine's LAN address, any free port)",
    )
    parser.add_argument("--code", help="use this room code (like 7-amber-falcon) instead of a random one")
    parser.add_argument("--name", default="", help="this node's name (default: the host name)")
    parser.add_argument(
        "--no-mdns", action="store_true", help="do not advertise the room; members use --peer"
    )
    parser.add_argument(
        "--model", type=model_path, metavar="MODEL", help="plan this model over the room as nodes come and go, and serve it "
        f"({MODEL_FORMS})"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="weights dtype (bf16 on GPUs, fp32 on CPUs)")
    parser.add_argument("--expect-nodes", type=positive_int, default=1, metavar="N", help="make the first plan once N nodes are in (1)")
    add_strategy_arguments(parser)
    parser.add_argument("--context", type=positive_int, default=4096, help="tokens of KV cache per session to plan for (4096)")
    parser.add_argument("--sessions", type=positive_int, default=4, help="concurrent answers to hold KV cache for (4)")
    parser.add_argument(
        "--heartbeat", type=positive_float, default=1.0, metavar="S", help="seconds between members' heartbeats (1)"
    )
    parser.add_argument(
        "--suspect-after", type=positive_int, default=3, metavar="BEATS", help="missed heartbeats before a node is suspected (3)"
    )
    parser.add_argument(
        "--dead-after", type=positive_float, default=6.0, metavar="S", help="seconds without a heartbeat before a node is dropped (6)"
    )
    parser.add_argument(
        "--replicas",
        type=_replicas,
        default=0,
        metavar="N|auto",
        help="standby copies of each stage on other nodes, where memory allows: a lost node's stage is "
        "taken over without loading (0; auto = 1)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=_chunk,
        default=None,
        metavar="auto|N",
        help="a prompt of at least twice this many tokens goes to a room of several stages in chunks of about "
        "this size, pipelined across the stages; 0: the whole prompt at once; auto: chunks of 128 where a "
        "token takes 20 ms or more (CPUs, small GPUs), whole prompts on fast GPUs (auto)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=positive_float,
        default=None,
        metavar="S",
        help="a token that takes longer has its stages checked and the answer replayed on those that answer "
        "(default: 50 predicted token times, at least 5 s)",
    )
    parser.add_argument(
        "--wire",
        choices=["auto", "native", "bf16", "fp16", "int8", "fp8"],
        default="auto",
        help="how hidden states cross between nodes: auto picks int8 (a float16 scale per 64 values) on "
        "links too slow for the model's dtype, native keeps it, bf16/fp16/int8/fp8 (e4m3) everywhere (auto)",
    )
    add_speculation_arguments(parser)
    _add_device_arguments(parser)
    from peerpipe.cli.http_opts import add_http_arguments

    add_http_arguments(parser)
    parser.set_defaults(func=host_cmd)
    return parser


def add_join_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("join", help="join a room by its code", description=join_cmd.__doc__)
    parser.add_argument("code", help="the room code the host printed, like 7-amber-falcon")
    parser.add_argument(
        "--peer", type=parse_address, metavar="HOST:PORT", help="the host's address (skips mDNS)"
    )
    parser.add_argument(
        "--listen",
        type=interface_address,
        metavar="HOST",
        help="this machine's address on the room's network: other nodes connect to it there and "
        "mDNS runs there only (default: the LAN address of the default route)",
    )
    parser.add_argument("--name", default="", help="this node's name (default: the host name)")
    parser.add_argument(
        "--timeout", type=positive_float, default=10.0, help="seconds to look for the host (default 10)"
    )
    parser.add_argument(
        "--wait-for-host",
        action="store_true",
        help="when the host is lost, wait for a host of the same code (a restarted one) instead of exiting",
    )
    parser.add_argument(
        "--model", type=model_path, metavar="MODEL",
        help="this machine's copy of the room's model (default: none; the layers this node serves are fetched "
        "from the room's peers, checked against the host's hashes, and kept in the cache for next time)",
    )
    _add_device_arguments(parser)
    parser.set_defaults(func=join_cmd)
    return parser


def _gpus(args: argparse.Namespace) -> list[GpuNode]:
    if args.gpus is None:
        return []
    if args.device is not None:
        raise PeerpipeError("give --gpus or --device, not both: --gpus picks each node's device")
    return gpu_nodes(args.gpus, args.name, args.memory)


def check_device(device: str | None) -> None:
    """``--device``, checked before anything is announced."""
    from peerpipe.cluster.capabilities import check_device as check

    check(device)


def check_model(model: Path | None) -> None:
    """A model folder's files, checked before anything is announced: a bad one is one line now,
    not a room whose stages never load."""
    if model is not None:
        from peerpipe.engine.loader import check_model_dir

        check_model_dir(model)


def check_draft(model: Path | None, draft: Path | None, mode: str | None) -> None:
    """A draft model must be a model with the served model's tokenizer (checked before a code is
    printed, like the model itself)."""
    if draft is None:
        if mode == "draft":
            raise PeerpipeError("--speculate draft needs --draft DIR (austen-draft for the bundled model)")
        return
    if model is None:
        raise PeerpipeError("--draft drafts for --model: give the model too")
    check_model(draft)
    from peerpipe.engine.draft_model import check_draft_dir

    check_draft_dir(draft, model)


def host_cmd(args: argparse.Namespace) -> int:
    """Open a room: print its code and address, measure this machine, then report members as
    they come and go and, with --model, plan the model over the room."""
    return run_command(lambda signals: _host(args, signals))


async def _host(args: argparse.Namespace, signals: Interrupts) -> int:
    from peerpipe.cli.http_opts import reserve_http, start_api
    from peerpipe.cli.room_registry import registered
    from peerpipe.cluster.config import ClusterConfig
    from peerpipe.cluster.host_service import describe_device
    from peerpipe.cluster.membership import MembershipConfig
    from peerpipe.inference.entry import EntryConfig
    from peerpipe.inference.pipeline import Timeouts
    from peerpipe.plan import Budget
    from peerpipe.python_api import create_room

    # Everything a user typed is checked before a code is printed: nobody is sent a code for a
    # room that is about to fail.
    try:
        membership = MembershipConfig(args.heartbeat, args.suspect_after, args.dead_after)
    except ValueError as exc:
        raise PeerpipeError(str(exc)) from None
    gpus = _gpus(args)
    if len(gpus) > args.expect_nodes:
        args.expect_nodes = len(gpus)  # the first plan waits for every GPU's node
    code = parse_code(args.code) if args.code else None
    config = ClusterConfig(
        membership=membership,
        expect_nodes=args.expect_nodes,
        budget=Budget(context_tokens=args.context, sessions=args.sessions),
        strategy=args.strategy,
        objective=args.objective,
        replicas=args.replicas,
        wire=args.wire,
    )
    timeouts = Timeouts(stall_s=args.stall_timeout)
    _use_threads(args)
    check_device(args.device)
    check_model(args.model)
    check_draft(args.model, args.draft, args.speculate)
    record: list[Callable[[str], None]] = []  # the registry entry's writer, once the room is open
    with contextlib.ExitStack() as registry:
        http = reserve_http(args, say)
        if http is not None:
            registry.callback(http.close)

        def opened(code: RoomCode, address: Address) -> None:
            say(f"room code: {code}")
            say(f"listening on {address[0]}:{address[1]}")
            record.append(registry.enter_context(registered(str(code), f"{address[0]}:{address[1]}", "host")))

        async with create_room(
            args.model,
            listen=args.listen or (default_lan_ip(), 0),
            code=str(code) if code else None,
            name=gpus[0].name if gpus else args.name,
            advertise=not args.no_mdns,
            device=gpus[0].device if gpus else args.device,
            dtype=args.dtype,
            memory_gb=gpus[0].memory_gb if gpus else args.memory,
            config=config,
            entry_config=EntryConfig(timeouts=timeouts, prefill_chunk=args.prefill_chunk),
            quick=args.quick,
            report=say,
            on_open=opened,
            speculate=args.speculate,
            speculate_max=args.speculate_max,
            draft=args.draft,
            quantize=args.quantize,
        ) as room:
            say(f"this node: {describe_device(room.cluster.info)}")
            children = GpuChildren(say)
            if gpus:
                # The children listen where the host does (so the planner sees one machine) and
                # dial it there, or on loopback when it listens on every interface.
                host, port = room.address
                near = "127.0.0.1" if wildcard(host) else host
                await children.start(gpus[1:], str(room.code), (near, port), host, child_arguments(args))
            api = await start_api(room, args, say, http)
            signals.serving()
            room.cluster.rotate_hint = f"kill -USR1 {os.getpid()}"
            rotating = asyncio.create_task(_rotate_on_sigusr1(room, record[0]))
            try:
                await signals.stop.wait()
            finally:
                rotating.cancel()
                await children.stop()
                if api is not None:
                    await api.close()
    say("room closed")
    return 0


async def _rotate_on_sigusr1(room: Room, record: Callable[[str], None]) -> None:
    """SIGUSR1 gives the room a fresh code without restarting it (someone was guessing)."""
    wanted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, wanted.set)
    try:
        while True:
            await wanted.wait()
            wanted.clear()
            code = await room.rotate_code()
            record(str(code))
            say(f"room code: {code}   (fresh: the old code admits no one; members already in stay)")
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


def join_cmd(args: argparse.Namespace) -> int:
    """Join a room by code, measure this machine and serve the cluster until Ctrl-C (which says
    goodbye politely) or until the host closes the room."""
    return run_command(lambda signals: _join(args, signals))


async def _join(args: argparse.Namespace, signals: Interrupts) -> int:
    code = parse_code(args.code)
    _use_threads(args)
    gpus = _gpus(args)
    if gpus:
        args.device, args.name, args.memory = gpus[0].device, gpus[0].name, gpus[0].memory_gb
    check_device(args.device)
    check_model(args.model)
    if args.quantize == "keep" and args.model is None:  # (said before joining, not after)
        raise BadValue(
            "--quantize keep keeps this node's own GGUF's precision: give --model FILE.gguf, or let the plan choose (auto)"
        )
    children = GpuChildren(say)
    try:
        return await _join_as(args, code, signals, children, gpus[1:])
    finally:
        await children.stop()


async def _join_as(
    args: argparse.Namespace, code: RoomCode, signals: Interrupts, children: GpuChildren, more: list[GpuNode]
) -> int:
    from peerpipe.cli.room_registry import registered
    from peerpipe.python_api import join_room
    from peerpipe.room import RoomError
    from peerpipe.transport import TransportError

    stop = signals.stop
    attempt = 0
    record: list[Callable[[str], None]] = []  # this try's registry entry writer
    starting: list[asyncio.Future[None]] = []
    while True:
        with contextlib.ExitStack() as registry:

            record.clear()

            def joined(host: PeerInfo) -> None:
                say(f"joined room {code.nameplate}: host {host.name} at {host.address[0]}:{host.address[1]}")
                if more and not starting:  # the other GPUs' nodes join the host found here, once
                    listen = args.listen or default_lan_ip()
                    extra = child_arguments(args)
                    starting.append(asyncio.ensure_future(children.start(more, str(code), host.address, listen, extra)))
                record.append(registry.enter_context(registered(str(code), f"{host.address[0]}:{host.address[1]}", "member")))

            def new_code(fresh: RoomCode) -> None:
                nonlocal code
                code = fresh  # a rejoin after losing the host uses it too
                if record:
                    record[0](str(fresh))

            try:
                async with join_room(
                    str(code),
                    peer=args.peer,
                    model=args.model,
                    listen=args.listen or default_lan_ip(),
                    name=args.name,
                    device=args.device,
                    memory_gb=args.memory,
                    discovery_timeout_s=args.timeout,
                    quick=args.quick,
                    report=say,
                    stop=stop,
                    on_join=joined,
                    on_new_code=new_code,
                    quantize=args.quantize,
                ) as node:
                    attempt = 0
                    signals.serving()
                    await node.closed()
                    if not stop.is_set():
                        return 0  # the host closed the room; the service said so
                break
            except (RoomError, TransportError) as exc:
                if not args.wait_for_host or stop.is_set():
                    raise
                attempt += 1
                if attempt == 1:
                    say(f"{exc}; waiting for a host of room {code.nameplate} (Ctrl-C stops)")
        # A short pause between tries, cut short by Ctrl-C: the host may take a while to come back.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(5.0, 0.5 * attempt))
        if stop.is_set():
            break
    say("left the room")
    return 0
