"""``--http`` and ``--api-key``: where the host serves the OpenAI API and the dashboard."""

from __future__ import annotations

import argparse
import os
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
        "--max-pending", type=int, default=64, metavar="N", help="requests that may wait for a session before 'busy' (64)"
    )


async def start_api(
    room: Room, args: argparse.Namespace, say: Callable[[str], None], *, any_port_if_busy: bool = False
) -> ApiServer | None:
    """Start the HTTP server the arguments ask for and say where it is; None with --http off.

    With ``any_port_if_busy`` (the demo), a default port that is taken gives way to a free one."""
    if args.http is None:
        return None
    from peerpipe.api.errors import ListenError
    from peerpipe.api.server import ApiServer

    if args.max_pending < 0:
        from peerpipe.errors import PeerpipeError

        raise PeerpipeError("--max-pending must be 0 or more")
    api = ApiServer(room.cluster, room.inference, api_key=args.api_key, max_pending=args.max_pending)
    try:
        url = await api.start(*args.http)
    except ListenError as exc:
        if not any_port_if_busy or args.http[1] == 0:
            raise
        say(f"{exc}; using a free port instead")
        url = await api.start(args.http[0], 0)
    say(f"dashboard: {url}/")
    say(f"OpenAI API: {url}/v1" + (" (needs the API key)" if args.api_key else ""))
    if not api.loopback and not args.api_key:
        say("warning: the API is open to the network with no --api-key; anyone who can reach it can use the room")
    return api
