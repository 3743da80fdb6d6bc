"""``peerpipe host`` and ``peerpipe join``: open a room, or join one by its code.

Output for people (and tests) goes to stdout, one flushed line per happening;
logs are structured and go to stderr, quiet unless asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from peerpipe.room import (
    Address,
    ConnectionClosedError,
    HandshakeRefused,
    Host,
    Member,
    PeerJoined,
    PeerLeft,
    default_lan_ip,
    generate_code,
    parse_code,
    run,
)

POLL_S = 0.5


def say(line: str) -> None:
    print(line, flush=True)


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


def _listen_address(text: str) -> Address:
    return parse_address(text, default_port=0)


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
        metavar="HOST",
        help="this machine's address on the room's network; mDNS runs there only "
        "(default: the LAN address of the default route)",
    )
    parser.add_argument("--name", default="", help="this node's name (default: the host name)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to look for the host (default 10)"
    )
    parser.set_defaults(func=join_cmd)
    return parser


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def host_cmd(args: argparse.Namespace) -> int:
    """Open a room: print its code and address, then report members as they come and go."""
    return run(_host(args))


async def _host(args: argparse.Namespace) -> int:
    code = parse_code(args.code) if args.code else generate_code()
    listen = args.listen or (default_lan_ip(), 0)
    stop = _stop_on_signals()
    async with Host(code, name=args.name) as host:
        ip, port = await host.open(listen, advertise=not args.no_mdns)
        say(f"room code: {code}")
        say(f"listening on {ip}:{port}")
        while not stop.is_set():
            try:
                event = await host.next_event(POLL_S)
            except TimeoutError:
                continue
            if isinstance(event, PeerJoined):
                peer = event.peer
                say(f"joined: {peer.name} ({peer.node_id[:8]}) from {peer.address[0]}:{peer.address[1]}")
            elif isinstance(event, PeerLeft):
                how = "said goodbye" if event.error is None else f"lost: {event.reason}"
                say(f"left: {event.peer.name} ({event.peer.node_id[:8]}), {how}")
            elif isinstance(event, HandshakeRefused):
                say(f"refused {event.address[0]}:{event.address[1]}: {event.error}")
        await host.leave("the host closed the room")
    say("room closed")
    return 0


def join_cmd(args: argparse.Namespace) -> int:
    """Join a room by code and stay a member until Ctrl-C (which says goodbye politely)."""
    return run(_join(args))


async def _join(args: argparse.Namespace) -> int:
    code = parse_code(args.code)
    stop = _stop_on_signals()
    async with Member(code, name=args.name) as member:
        interface = args.listen or default_lan_ip()
        host = await member.join(args.peer, interface=interface, discovery_timeout_s=args.timeout)
        say(f"joined room {code.nameplate}: host {host.name} at {host.address[0]}:{host.address[1]}")
        while not stop.is_set():
            try:
                event = await member.next_event(POLL_S)
            except TimeoutError:
                continue
            if isinstance(event, PeerLeft) and event.peer.node_id == host.node_id:
                if event.error is not None:
                    raise ConnectionClosedError(f"lost the host: {event.error}")
                say(f"left: {event.reason or 'the host left'}")
                return 0
        await member.leave("member left")
    say("left the room")
    return 0
