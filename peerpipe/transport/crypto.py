"""Key agreement and record protection, free of I/O.

SPAKE2 (symmetric) turns the room code into a shared key that an eavesdropper
cannot test offline; HKDF-SHA256 derives one AES-256-GCM key and one confirmation
key per direction, both bound to the transcript; records use implicit 96-bit
counter nonces so a replayed, dropped or reordered record fails authentication.
See docs/transport.md for the full key schedule.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from enum import Enum
from typing import Protocol

import spake2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peerpipe.transport.errors import HandshakeError, RecordAuthError, WrongCodeError

APP_ID = b"peerpipe/v1"
TAG_BYTES = 16
NONCE_BYTES = 12
CONFIRM_BYTES = 32
PAKE_MSG_BYTES = 33
# Far below 2**96: a sender stops long before a nonce could repeat.
MAX_RECORDS = 2**64


class Secret(Protocol):
    """What both ends must share: the room code's normalised text is the PAKE password."""

    @property
    def password(self) -> bytes: ...


class Role(Enum):
    """Which end of the TCP connection we are; it only orients the per-direction keys."""

    DIALER = "dialer"
    LISTENER = "listener"

    @property
    def other(self) -> Role:
        return Role.LISTENER if self is Role.DIALER else Role.DIALER


def _hkdf(secret: bytes, salt: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=APP_ID + b" " + label.encode()).derive(
        secret
    )


class Pake:
    """One SPAKE2 run: ``start()`` gives our message, ``finish(theirs)`` the session keys."""

    def __init__(self, password: bytes, role: Role) -> None:
        self._role = role
        self._spake = spake2.SPAKE2_Symmetric(password, idSymmetric=APP_ID)
        self._ours: bytes | None = None

    def start(self) -> bytes:
        self._ours = self._spake.start()
        return self._ours

    def finish(self, theirs: bytes) -> SessionKeys:
        if self._ours is None:
            raise RuntimeError("Pake.finish() called before start()")
        if len(theirs) != PAKE_MSG_BYTES:
            raise HandshakeError(f"the peer's key-exchange message has {len(theirs)} bytes, not 33")
        if hmac.compare_digest(theirs, self._ours):
            raise HandshakeError("the peer reflected our own key-exchange message back")
        try:
            shared = self._spake.finish(theirs)
        except (ValueError, spake2.SPAKEError) as exc:
            raise HandshakeError(f"the peer's key-exchange message is invalid ({exc})") from exc
        if self._role is Role.DIALER:
            dialer_msg, listener_msg = self._ours, theirs
        else:
            dialer_msg, listener_msg = theirs, self._ours
        transcript = hashlib.sha256(APP_ID + b" handshake" + dialer_msg + listener_msg).digest()
        return SessionKeys.derive(shared, transcript, self._role)


class SessionKeys:
    """Per-direction keys for one connection; ``send_*`` for our direction, ``recv_*`` for theirs."""

    def __init__(
        self, transcript: bytes, send_key: bytes, recv_key: bytes, send_confirm: bytes, recv_confirm: bytes
    ) -> None:
        self.transcript = transcript
        self.send_key = send_key
        self.recv_key = recv_key
        self._send_confirm = send_confirm
        self._recv_confirm = recv_confirm

    @classmethod
    def derive(cls, shared: bytes, transcript: bytes, role: Role) -> SessionKeys:
        def keys_of(r: Role) -> tuple[bytes, bytes]:
            return (
                _hkdf(shared, transcript, f"{r.value} record"),
                _hkdf(shared, transcript, f"{r.value} confirm"),
            )

        ours, theirs = keys_of(role), keys_of(role.other)
        return cls(transcript, ours[0], theirs[0], ours[1], theirs[1])

    def confirmation(self) -> bytes:
        """Our key-confirmation tag: proves we hold the key without revealing anything about the code."""
        return hmac.new(self._send_confirm, self.transcript, hashlib.sha256).digest()

    def check_confirmation(self, tag: bytes) -> None:
        expected = hmac.new(self._recv_confirm, self.transcript, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise WrongCodeError()


# The 96-bit nonce is the record counter, big endian; counters stay below 2**64 (MAX_RECORDS).
_NONCE = struct.Struct(">4xQ")
assert _NONCE.size == NONCE_BYTES


class RecordSealer:
    """Encrypts our records in order; the counter is the nonce, so it must never go back."""

    def __init__(self, key: bytes) -> None:
        self._encrypt = AESGCM(key).encrypt
        self.counter = 0

    def seal(self, plaintext: bytes | memoryview) -> bytes:
        counter = self.counter
        if counter >= MAX_RECORDS:
            raise RecordAuthError("this connection has sent too many records: reconnect")
        self.counter = counter + 1
        return self._encrypt(_NONCE.pack(counter), plaintext, None)


class RecordOpener:
    """Decrypts the peer's records; any record out of place fails its tag."""

    def __init__(self, key: bytes) -> None:
        self._decrypt = AESGCM(key).decrypt
        self.counter = 0

    def open(self, ciphertext: bytes | memoryview) -> bytes:
        """Decrypt one record (a view of the receive buffer is fine: the plaintext is a new object)."""
        if len(ciphertext) < TAG_BYTES:
            raise RecordAuthError(
                "a record is shorter than its authentication tag: the connection was closed"
            )
        try:
            plaintext = self._decrypt(_NONCE.pack(self.counter), ciphertext, None)
        except InvalidTag as exc:
            raise RecordAuthError() from exc
        self.counter += 1
        return plaintext
