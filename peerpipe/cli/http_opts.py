"""``--http`` and ``--api-key``: where the host serves the OpenAI API and the dashboard."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from peerpipe.cli.args import parse_address
from peerpipe.transport import Address

if TYPE_CHECKING:  # both pull in torch and aiohttp: every command's start would pay for them
    from peerpipe.api.server import ApiServer
    from peerpipe.python_api import Room

DEFAULT_HTTP = "127.0.0.1:8088"
HTTP_ENV = "PEERPIPE_HTTP"  # overrides the default address (tests set 127.0.0.1:0)


def _http_address(text: str) -> Address | None:
    if text.lower() == "off":
        return None
    return parse_address(text, default_port=8088)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number, 0 or more")
    return int(text)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(HTTP_ENV) or DEFAULT_HTTP
    parser.add_argument(
        "--http",
        type=_http_address,
        default=default,  # argparse parses a string default only when the command runs
        metavar="HOST:PORT",
        help=f"serve the OpenAI API and the dashboard here ({default}, or ${HTTP_ENV}; 0.0.0.0:PORT serves "
        "the LAN; 'off' for none)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PEERPIPE_API_KEY") or None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on the API (default: $PEERPIPE_API_KEY, else none)",
    )
    parser.add_argument(
        "--https", action="store_true",
        help="serve over TLS with a self-signed certificate (browsers lend their GPU only to secure pages)",
    )
    parser.add_argument(
        "--cors", action="append", default=[], metavar="ORIGIN",
        help="let web pages from ORIGIN (http://localhost:5173, say; * for any) call the API from a browser "
        "(repeatable; default: none, so no other site's page can use the room)",
    )
    parser.add_argument(
        "--max-pending", type=_non_negative, default=64, metavar="N", help="requests that may wait for a session before 'busy' (64)"
    )


def reserve_http(args: argparse.Namespace, say: Callable[[str], None], *, any_port_if_busy: bool = False) -> socket.socket | None:
    """Bind the HTTP address the arguments ask for, before the room is announced, so a taken port
    is an error at once; None with --http off. With ``any_port_if_busy`` (the demo), a default
    port that is taken gives way to a free one."""
    from peerpipe.api.errors import ListenError

    if args.http is None:
        return None
    host, port = args.http
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        why = f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}"
        if not any_port_if_busy or port == 0:
            raise ListenError(f"{why} (use --http HOST:PORT or --http off)") from None
    say(f"{why}; using a free port instead")
    try:
        return socket.create_server((host, 0), family=family)
    except OSError as exc:
        raise ListenError(f"cannot serve HTTP on {host}: {exc.strerror or exc}") from None


async def start_api(
    room: Room, args: argparse.Namespace, say: Callable[[str], None], sock: socket.socket | None
) -> ApiServer | None:
    """Serve the API on the socket ``reserve_http`` bound, and say where it is; None with --http off."""
    if sock is None:
        return None
    from peerpipe.api.server import ApiServer

    api = ApiServer(
        room.cluster, room.inference, api_key=args.api_key, max_pending=args.max_pending, browsers=room.browser_host(),
        cors=args.cors,
    )
    url = await api.start(sock=sock, https=args.https)
    say(f"dashboard: {url}/")
    say(f"OpenAI API: {url}/v1" + (" (needs the API key)" if args.api_key else ""))
    if not api.loopback and not args.api_key:
        say("warning: the API is open to the network with no --api-key; anyone who can reach it can use the room")
    return api
