"""Cutting large tensors into ``tensor-chunk`` messages and putting them back together (sans-IO).

``split(msg)`` returns the chunks of every large tensor of ``msg`` followed by ``msg`` itself, where
each such tensor is replaced by a *placeholder*: a ``TensorData`` with the same dtype, shape,
encoding and checksum, no data, and ``ref`` set to the chunks' ``tensor_id``. The receiver feeds
every decoded message to a ``Reassembler``, which swallows chunks and hands back the original message
once its placeholders can be filled.
"""

from __future__ import annotations

import dataclasses
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable

from peerpipe.protocol.codec import tensor_fields
from peerpipe.protocol.errors import ChecksumError, ChunkError
from peerpipe.protocol.limits import DEFAULT_LIMITS, Limits
from peerpipe.protocol.messages import Message, TensorChunk
from peerpipe.protocol.tensor import TensorData, chunk_span
from peerpipe.protocol.weights import WeightReply

# How many finished or failed tensor ids to remember, so that late or duplicate chunks of them are
# reported instead of silently opening a new buffer that would only time out.
_REMEMBERED_IDS = 4096


def is_bulk(msg: Message) -> bool:
    """True for data-plane messages: chunks and messages that carry a tensor.

    The transport may send control messages ahead of bulk ones and interleave the frames of
    different ``split`` results, but must send the frames of one ``split`` in order, because a
    placeholder message must arrive after its chunks.
    """
    if isinstance(msg, TensorChunk):
        return True
    return any(getattr(msg, name) is not None for name in tensor_fields(type(msg)))


def is_background(msg: Message) -> bool:
    """True for weight bulk: sent only when no control or data-plane frame waits (weights never
    slow an answer down)."""
    return isinstance(msg, WeightReply)


def _new_tensor_id() -> str:
    return uuid.uuid4().hex


def split(
    msg: Message,
    limits: Limits = DEFAULT_LIMITS,
    new_id: Callable[[], str] = _new_tensor_id,
) -> list[Message]:
    """Return ``[chunks..., msg']`` where every tensor of more than ``limits.chunk_bytes`` bytes is
    sent as chunks and replaced in ``msg'`` by a placeholder; ``[msg]`` when nothing is large.

    ``new_id`` makes tensor ids; they must be unique on the connection for ``chunk_timeout_s``.
    Chunk data are memoryview slices of the tensor (no copies).
    """
    out: list[Message] = []
    replacements: dict[str, TensorData] = {}
    for name in tensor_fields(type(msg)):
        tensor: TensorData | None = getattr(msg, name)
        # len(data) is nbytes for a tensor that is not a placeholder (checked when it was made).
        if tensor is None or tensor.ref is not None or len(tensor.data) <= limits.chunk_bytes:
            continue
        if tensor.nbytes > limits.max_tensor_bytes:
            raise ChunkError(
                f"{msg.TAG}.{name}: tensor of {tensor.nbytes} bytes exceeds limit {limits.max_tensor_bytes}"
            )
        total = tensor.nbytes
        count = -(-total // limits.chunk_bytes)
        if count > limits.max_chunks:
            raise ChunkError(f"{msg.TAG}.{name}: {count} chunks exceed limit {limits.max_chunks}")
        tensor_id = new_id()
        data = memoryview(tensor.data)
        for index in range(count):
            start, end = chunk_span(index, count, total)
            out.append(TensorChunk(tensor_id, index, count, total, data[start:end]))
        replacements[name] = dataclasses.replace(tensor, data=b"", ref=tensor_id)
    out.append(dataclasses.replace(msg, **replacements) if replacements else msg)
    return out


class _Pending:
    """One tensor whose chunks are arriving."""

    __slots__ = ("buffer", "missing", "received", "total_bytes", "total_chunks", "touched")

    def __init__(self, total_chunks: int, total_bytes: int, now: float) -> None:
        self.total_chunks = total_chunks
        self.total_bytes = total_bytes
        self.buffer = bytearray(total_bytes)
        self.received = bytearray(total_chunks)
        self.missing = total_chunks
        self.touched = now


class Reassembler:
    """Receives decoded messages in arrival order and returns them ready for the application.

    ``feed`` returns ``None`` for a chunk and the message otherwise, with placeholders replaced by
    the reassembled tensors. Any ``ChunkError`` it raises has freed the tensor it names; other
    pending tensors are unaffected. Call ``expire(now)`` periodically to drop stalled tensors.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._pending: dict[str, _Pending] = {}
        self._done: OrderedDict[str, str] = OrderedDict()
        self._pending_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes held in buffers of tensors not yet handed back."""
        return self._pending_bytes

    @property
    def pending_tensors(self) -> int:
        return len(self._pending)

    def feed(self, msg: Message, now: float) -> Message | None:
        if isinstance(msg, TensorChunk):
            self._feed_chunk(msg, now)
            return None
        fields = tensor_fields(type(msg))
        for name in fields:
            tensor = getattr(msg, name)
            if tensor is not None and tensor.ref is not None:
                break
        else:
            return msg  # no placeholder to fill: the common case, without building lists
        names = [name for name in fields if getattr(msg, name) is not None]
        refs = [getattr(msg, name).ref for name in names if getattr(msg, name).ref is not None]
        if not refs:
            return msg
        if len(set(refs)) != len(refs):
            for ref in refs:
                self._discard(ref, "was discarded: its message referenced it twice")
            raise ChunkError(f"{msg.TAG}: one tensor id is referenced twice", refs[0])
        filled: dict[str, TensorData] = {}
        for position, name in enumerate(names):
            placeholder: TensorData = getattr(msg, name)
            if placeholder.ref is None:
                continue
            try:
                filled[name] = self._claim(msg.TAG, name, placeholder)
            except ChunkError:
                # The message is lost as a whole, so its other tensors must not linger.
                for later in names[position + 1 :]:
                    ref = getattr(msg, later).ref
                    if ref is not None:
                        self._discard(ref, "was discarded: its message failed")
                raise
        return dataclasses.replace(msg, **filled)

    def expire(self, now: float) -> list[ChunkError]:
        """Drop tensors with no new chunk for ``chunk_timeout_s``; return one error for each."""
        errors = []
        for tensor_id, pending in list(self._pending.items()):
            idle = now - pending.touched
            if idle > self.limits.chunk_timeout_s:
                self._discard(tensor_id, "timed out")
                errors.append(
                    ChunkError(
                        f"tensor {tensor_id}: no progress for {idle:.1f} s, "
                        f"{pending.missing} of {pending.total_chunks} chunks missing",
                        tensor_id,
                    )
                )
        return errors

    def _fail(self, tensor_id: str, why: str) -> ChunkError:
        self._discard(tensor_id, f"was discarded: {why}")
        return ChunkError(f"tensor {tensor_id}: {why}", tensor_id)

    def _discard(self, tensor_id: str, outcome: str) -> None:
        pending = self._pending.pop(tensor_id, None)
        if pending is not None:
            self._pending_bytes -= pending.total_bytes
        self._done[tensor_id] = outcome
        self._done.move_to_end(tensor_id)
        while len(self._done) > _REMEMBERED_IDS:
            self._done.popitem(last=False)

    def _feed_chunk(self, chunk: TensorChunk, now: float) -> None:
        tensor_id = chunk.tensor_id
        pending = self._pending.get(tensor_id)
        if pending is None:
            outcome = self._done.get(tensor_id)
            if outcome is not None:
                # Not _fail(): the tensor was already delivered or freed; nothing more to drop.
                raise ChunkError(f"tensor {tensor_id}: chunk arrived after the tensor {outcome}", tensor_id)
            pending = self._open(chunk, now)
        if chunk.total_chunks != pending.total_chunks or chunk.total_bytes != pending.total_bytes:
            raise self._fail(
                tensor_id,
                f"chunk says {chunk.total_chunks} chunks of {chunk.total_bytes} bytes, earlier chunks "
                f"said {pending.total_chunks} chunks of {pending.total_bytes} bytes",
            )
        if pending.received[chunk.chunk_index]:
            raise self._fail(tensor_id, f"chunk {chunk.chunk_index} arrived twice")
        start, end = chunk_span(chunk.chunk_index, chunk.total_chunks, chunk.total_bytes)
        memoryview(pending.buffer)[start:end] = chunk.data
        pending.received[chunk.chunk_index] = 1
        pending.missing -= 1
        pending.touched = now

    def _open(self, chunk: TensorChunk, now: float) -> _Pending:
        limits = self.limits
        tensor_id = chunk.tensor_id
        why = None
        if chunk.total_bytes > limits.max_tensor_bytes:
            why = f"{chunk.total_bytes} bytes exceed the tensor limit {limits.max_tensor_bytes}"
        elif chunk.total_chunks > limits.max_chunks:
            why = f"{chunk.total_chunks} chunks exceed the limit {limits.max_chunks}"
        elif len(self._pending) >= limits.max_pending_tensors:
            why = f"more than {limits.max_pending_tensors} tensors would be pending"
        elif self._pending_bytes + chunk.total_bytes > limits.max_pending_bytes:
            why = f"pending tensors would exceed {limits.max_pending_bytes} bytes"
        if why is not None:
            raise self._fail(tensor_id, why)
        pending = _Pending(chunk.total_chunks, chunk.total_bytes, now)
        self._pending[tensor_id] = pending
        self._pending_bytes += chunk.total_bytes
        return pending

    def _claim(self, tag: str, name: str, placeholder: TensorData) -> TensorData:
        tensor_id = placeholder.ref
        assert tensor_id is not None
        pending = self._pending.get(tensor_id)
        if pending is None:
            outcome = self._done.get(tensor_id, "never sent a chunk")
            raise self._fail(tensor_id, f"{tag}.{name} refers to a tensor that {outcome}")
        if pending.missing:
            raise self._fail(
                tensor_id,
                f"{tag}.{name} arrived with {pending.missing} of {pending.total_chunks} chunks missing",
            )
        if pending.total_bytes != placeholder.nbytes:
            raise self._fail(
                tensor_id,
                f"{tag}.{name} is {placeholder.nbytes} bytes but its chunks hold {pending.total_bytes}",
            )
        actual = zlib.crc32(pending.buffer)
        if actual != placeholder.checksum:
            self._discard(tensor_id, "was discarded: checksum mismatch")
            raise ChecksumError(
                f"tensor {tensor_id} ({tag}.{name}) is corrupt: crc32 {actual:#010x}, "
                f"sender said {placeholder.checksum:#010x}",
                tensor_id,
            )
        self._discard(tensor_id, "was delivered")
        return dataclasses.replace(placeholder, data=memoryview(pending.buffer), ref=None)
