"""The secured link between the host and a browser node (docs/webgpu.md, "Security").

A browser can only dial out, and it has WebCrypto but no PAKE, so it proves it holds a
high-entropy secret instead of the room's short code: a one-time join link the dashboard makes
(``#k=SECRET`` in the URL fragment, never sent over HTTP), or the credential the host gave it at
its first join (kept in the tab's sessionStorage, so a reload rejoins).

    browser → host  {"v": PROTOCOL, "id": secret_id(secret), "nonce": 16 random bytes}   (JSON text)
    host → browser  {"nonce": 16 random bytes}   or {"error": why}, and the socket closes
    both            HKDF-SHA256(secret, salt = browser nonce | host nonce, info = PROTOCOL)
                    → 32-byte AES-GCM key per direction; the 12-byte IV counts frames from 0
    browser → host  sealed {"op": "auth", adapter facts}: a wrong secret cannot seal it
    host → browser  sealed {"op": "welcome", "credential": …}

Every later frame is sealed: ``u32 header length | JSON header | payload bytes``, encrypted and
authenticated as a whole. Nothing but a sealed frame is accepted after the nonces.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peerpipe.errors import PeerpipeError

PROTOCOL = "peerpipe-browser-1"
SECRET_BYTES = 32
LINK_TTL_S = 15 * 60.0  # a join link nobody used is forgotten after this
MAX_HEADER = 1 << 20


class BrowserLinkError(PeerpipeError):
    """A browser's frame or handshake that cannot be accepted: the text says why."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise BrowserLinkError(f"not base64url: {text[:20]!r}") from exc


def secret_id(secret: bytes) -> str:
    """What the browser names its secret by (the secret itself never travels)."""
    return hashlib.sha256(b"peerpipe-browser-id" + secret).hexdigest()[:16]


@dataclass
class BrowserSecrets:
    """The host's join links (one use each) and the credential each joined browser holds (one at
    a time: every join by a link or a credential gives a new one and ends the old)."""

    links: dict[str, tuple[bytes, float]] = field(default_factory=dict)  # id -> (secret, made at)
    credentials: dict[str, bytes] = field(default_factory=dict)
    # Taken by a handshake under way: tabs that open one link at once find it gone.
    claimed: dict[str, tuple[bool, bytes, float]] = field(default_factory=dict)  # id -> (a link?, secret, made at)

    def new_link(self) -> bytes:
        now = time.monotonic()
        self.links = {k: v for k, v in self.links.items() if now - v[1] < LINK_TTL_S}
        secret = os.urandom(SECRET_BYTES)
        self.links[secret_id(secret)] = (secret, now)
        return secret

    def claim(self, ident: str) -> bytes | None:
        """The secret of link or credential ``ident``, taken for one handshake (``release`` gives
        it back if that fails); None when it is unknown, expired or taken."""
        if ident in self.credentials:
            secret = self.credentials.pop(ident)
            self.claimed[ident] = (False, secret, time.monotonic())
            return secret
        link = self.links.pop(ident, None)
        if link is None or time.monotonic() - link[1] >= LINK_TTL_S:
            return None
        self.claimed[ident] = (True, *link)
        return link[0]

    def release(self, ident: str) -> None:
        """A handshake that did not finish: its link or credential is good again."""
        taken = self.claimed.pop(ident, None)
        if taken is None:
            return
        is_link, secret, made = taken
        if is_link:
            self.links[ident] = (secret, made)
        else:
            self.credentials[ident] = secret

    def redeem(self, ident: str) -> bytes:
        """The handshake with ``ident`` succeeded: the credential for this browser's next join.
        ``ident`` stays taken until ``spent`` (the tab has the new one) or ``release``."""
        credential = os.urandom(SECRET_BYTES)
        self.credentials[secret_id(credential)] = credential
        return credential

    def spent(self, ident: str) -> None:
        self.claimed.pop(ident, None)

    def withdraw(self, credential: bytes) -> None:
        """A credential that never reached its tab."""
        self.credentials.pop(secret_id(credential), None)


def parse_hello(text: str) -> tuple[str, bytes]:
    """The browser's first message: (secret id, its nonce)."""
    try:
        hello = json.loads(text)
    except ValueError:
        raise BrowserLinkError("the first message is not JSON") from None
    if not isinstance(hello, dict) or hello.get("v") != PROTOCOL:
        raise BrowserLinkError(f"this host speaks {PROTOCOL}; reload the page from the host's dashboard")
    ident, nonce = hello.get("id"), hello.get("nonce")
    if not isinstance(ident, str) or not isinstance(nonce, str):
        raise BrowserLinkError("the hello needs an id and a nonce")
    raw = unb64(nonce)
    if len(raw) != 16:
        raise BrowserLinkError("the hello's nonce is not 16 bytes")
    return ident, raw


class Sealer:
    """One direction's AES-GCM: frames are numbered, so a replayed, dropped or reordered frame fails."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._count = 0

    def _iv(self) -> bytes:
        iv = struct.pack(">IQ", 0, self._count)
        self._count += 1
        return iv

    def seal(self, header: dict[str, Any], payload: bytes = b"") -> bytes:
        raw = json.dumps(header, separators=(",", ":")).encode()
        return self._aead.encrypt(self._iv(), struct.pack("<I", len(raw)) + raw + payload, None)

    def open(self, frame: bytes) -> tuple[dict[str, Any], bytes]:
        try:
            plain = self._aead.decrypt(self._iv(), frame, None)
        except InvalidTag:
            raise BrowserLinkError("a frame failed authentication (wrong secret, or tampered with)") from None
        return unpack(plain)


def unpack(plain: bytes) -> tuple[dict[str, Any], bytes]:
    if len(plain) < 4:
        raise BrowserLinkError("a frame shorter than its header length")
    (size,) = struct.unpack_from("<I", plain)
    if size > MAX_HEADER or 4 + size > len(plain):
        raise BrowserLinkError(f"a frame's header of {size} bytes does not fit it")
    try:
        header = json.loads(plain[4 : 4 + size])
    except ValueError:
        raise BrowserLinkError("a frame's header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise BrowserLinkError("a frame's header has no op")
    return header, plain[4 + size :]


def keys(secret: bytes, browser_nonce: bytes, host_nonce: bytes) -> tuple[Sealer, Sealer]:
    """(from the browser, to the browser)."""
    okm = HKDF(hashes.SHA256(), 64, browser_nonce + host_nonce, PROTOCOL.encode()).derive(secret)
    return Sealer(okm[:32]), Sealer(okm[32:])
