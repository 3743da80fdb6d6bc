"""Argument types the commands share."""

from __future__ import annotations

import argparse

from peerpipe.transport import Address


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
