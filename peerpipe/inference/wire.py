"""Tensors to and from the wire, in the model's own dtype (bf16 travels as its bit patterns) or
in a stage's wire format (16 bits, or a byte per value with a float16 scale per block of 64
values: int8 or float8 e4m3, the "q8b64" and "f8b64" encodings of protocol/tensor.py), and sampling parameters to and from their wire record.

Hidden states are encoded where they were computed and decoded where they are used: on a GPU the
bytes, not the floats, cross PCIe both ways."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from peerpipe.engine import gpu_wait
from peerpipe.engine.sampling import SamplingParams
from peerpipe.protocol import Sampling, TensorData
from peerpipe.protocol.tensor import BLOCK_ENCODINGS, Q8_BLOCK, encoded_nbytes
from peerpipe.transport.shared_memory import Ref, Ring, Segments, SharedMemoryError

_AS_WIRE = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
}
_FROM_WIRE = {name: dtype for dtype, name in _AS_WIRE.items()}
WIRE_NAMES = _AS_WIRE  # a torch dtype's name on the wire
_CPU = torch.device("cpu")
_F16_MAX = float(torch.finfo(torch.float16).max)
_F16_SUB = 2.0**-24  # float16's smallest step (subnormal)


def to_wire(t: torch.Tensor) -> TensorData:
    name = _AS_WIRE.get(t.dtype)
    if name is None:
        raise TypeError(f"no wire form for {t.dtype}")
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return TensorData.from_numpy(t.view(torch.int16).numpy().view(np.uint16), dtype="bfloat16")
    return TensorData.from_numpy(t.numpy())


def ids_to_wire(ids: Sequence[int], shape: tuple[int, ...] | None = None) -> TensorData:
    """Token ids as an int64 wire tensor (``[len(ids)]`` unless ``shape`` says), made without a
    torch tensor: every decode step of every answer sends some, and the detour cost 20-30 µs."""
    return TensorData("int64", shape or (len(ids),), np.asarray(ids, dtype="<i8").tobytes())


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def encode_hidden(batch: torch.Tensor, wire: str, ring: Ring | None = None) -> list[TensorData]:
    """Each row of ``batch`` ``[B, S, H]`` in wire format ``wire`` ("" for the model's dtype),
    with one copy off the device for the whole batch; ``local``: each row copied from the device
    straight into ``ring`` (shared memory), inline where the ring is full."""
    if wire == "local" and ring is not None:
        # One row (a prompt) goes straight from the device into the ring; a batch of decode steps
        # leaves the device in one copy (one wait, not one per row), then each row to the ring.
        rows = batch if batch.shape[0] == 1 else batch.to(_CPU)
        return [_to_ring(rows[i : i + 1], ring) for i in range(rows.shape[0])]
    if wire in _HALF:
        batch = batch.to(_HALF[wire])
    if wire not in _BLOCKED:
        host = batch.to(_CPU)
        return [to_wire(host[i : i + 1]) for i in range(batch.shape[0])]
    name = _AS_WIRE[batch.dtype]
    codes, scales = _quantize_blocks(batch.reshape(-1, batch.shape[-1]), wire)
    codes = codes.reshape(batch.shape[0], -1).to(_CPU)
    scales = scales.view(batch.shape[0], -1).to(_CPU)
    shape = (1, *batch.shape[1:])
    encoding = _BLOCKED[wire]
    out = []
    for i in range(batch.shape[0]):
        payload = np.concatenate([codes[i].numpy().view(np.uint8), scales[i].numpy().view(np.uint8)])
        out.append(TensorData(name, tuple(shape), memoryview(payload), encoding))
    return out


class PinnedRows:
    """Hidden states off a GPU through one reused pinned buffer: one copy and one wait for the
    batch, then each row copied out as its own wire tensor or into a shared-memory ring (the
    buffer is the next step's)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def to_wire(self, batch: torch.Tensor, ring: Ring | None = None) -> list[TensorData]:
        """Each row inline, or with ``ring`` into shared memory (inline where it is full)."""
        nbytes = batch.numel() * batch.element_size()
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host = self._buffer[:nbytes].view(batch.dtype).view(batch.shape)
        host.copy_(batch, non_blocking=True)
        gpu_wait.wait(batch.device)
        if ring is not None:
            return [_to_ring(host[i : i + 1], ring) for i in range(batch.shape[0])]
        return [to_wire(host[i : i + 1].clone()) for i in range(batch.shape[0])]


_BLOCKED = {"int8": "q8b64", "fp8": "f8b64"}  # wire format -> tensor encoding
_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448


def _quantize_blocks(x: torch.Tensor, wire: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` ``[R, W]`` as a byte per value (int8, or float8 e4m3 for ``fp8``) ``[R, W]``
    and a float16 scale per block of Q8_BLOCK values ``[R, blocks]``, on ``x``'s device."""
    rows, width = x.shape
    blocks = -(-width // Q8_BLOCK)
    x = x.float()
    if blocks * Q8_BLOCK != width:
        x = torch.nn.functional.pad(x, (0, blocks * Q8_BLOCK - width))
    x = x.view(rows, blocks, Q8_BLOCK)
    top = 127.0 if wire == "int8" else _FP8_MAX
    # The scale is rounded up to a float16 (never below absmax / top, so no value clamps) before
    # use, and the receiver multiplies by exactly what was divided by.
    scale = (x.abs().amax(-1) * (1 / top * (1 + 2**-10)) + _F16_SUB).clamp(max=_F16_MAX).to(torch.float16)
    scaled = x / scale.float().unsqueeze(-1)
    if wire == "int8":
        codes = scaled.round_().clamp_(-127, 127).to(torch.int8)
    else:
        codes = scaled.clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8).view(torch.int8)
    return codes.view(rows, blocks * Q8_BLOCK)[:, :width], scale


def _decode_blocks(data: TensorData, device: torch.device) -> torch.Tensor:
    width = data.shape[-1]
    rows = len(data.data) // (width + -(-width // Q8_BLOCK) * 2)
    # (A NaN scale is passed on, not refused: it is one answer's overflow, and the decode runs for a
    # whole batch, whose other answers a refusal here would fail too.)
    raw = torch.from_numpy(np.frombuffer(data.data, dtype=np.uint8).copy()).to(device, non_blocking=True)
    codes = raw[: rows * width].view(rows, width)
    values = codes.view(torch.int8) if data.encoding == "q8b64" else codes.view(_FP8)
    scale = raw[rows * width :].clone().view(torch.float16).view(rows, -1)
    x = values.float() * scale.float().repeat_interleave(Q8_BLOCK, dim=1)[:, :width]
    return x.to(_FROM_WIRE[data.dtype]).view(data.shape)


def _to_ring(row: torch.Tensor, ring: Ring) -> TensorData:
    name = _AS_WIRE[row.dtype]
    nbytes = row.numel() * row.element_size()
    got = ring.alloc(nbytes)
    if got is None:  # inline; a row on the host may be a view of a buffer the next step reuses
        return to_wire(row if row.is_cuda else row.clone())
    ref, view = got
    torch.frombuffer(view, dtype=torch.uint8).view(row.dtype).view(row.shape).copy_(row)
    return TensorData(name, tuple(row.shape), ref.pack(), "shm")


_SEGMENTS = Segments()  # the rings of senders on this machine, as this process maps them


def _from_shared(data: TensorData, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    nbytes = encoded_nbytes(data.dtype, data.shape)

    def copy(view: memoryview) -> torch.Tensor:
        t = torch.frombuffer(view, dtype=torch.uint8).view(dtype).view(data.shape)
        return t.clone() if device.type == "cpu" else t.to(device)

    return _SEGMENTS.read(Ref.unpack(data.data), nbytes, copy)


def row_bytes(data: TensorData) -> memoryview | bytes:
    """The bytes of an inline tensor, or a shared-memory one's copied out (its sender may then
    reuse them)."""
    if data.encoding == "shm":
        return _SEGMENTS.read(Ref.unpack(data.data), encoded_nbytes(data.dtype, data.shape), bytes)
    return data.data


def shared_written(data: TensorData) -> bool:
    """Whether a tensor's bytes are there to read: False for a shared-memory one whose sender's
    GPU copy has yet to run (inference/gpu_rows.py); a bad reference is reading's to refuse."""
    if data.encoding != "shm":
        return True
    try:
        return _SEGMENTS.written(Ref.unpack(data.data))
    except SharedMemoryError:
        return True


def release_shared(data: TensorData) -> None:
    """Give a shared-memory tensor back unread (its request was dropped): the sender reuses it.
    One still pending is left to the sender's ring, which gives it up in time."""
    if data.encoding == "shm" and shared_written(data):
        with contextlib.suppress(SharedMemoryError):
            _SEGMENTS.read(Ref.unpack(data.data), encoded_nbytes(data.dtype, data.shape), lambda _: None)


def from_wire(data: TensorData, device: torch.device) -> torch.Tensor:
    dtype = _FROM_WIRE.get(data.dtype)
    if dtype is None:
        raise TypeError(f"unexpected tensor dtype {data.dtype} on the data plane")
    if data.encoding in BLOCK_ENCODINGS:
        return _decode_blocks(data, device)
    if data.encoding == "shm":
        return _from_shared(data, dtype, device)
    # A copy: the wire buffer belongs to the received frame, and torch wants writable memory.
    t = torch.from_numpy(np.array(data.to_numpy(), copy=True))
    if dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(device, non_blocking=True)


def sampling_to_wire(params: SamplingParams) -> Sampling:
    """The resolved parameters as the sampling record a session's first request carries."""
    return Sampling(
        params.temperature,
        params.top_k,
        params.top_p,
        params.min_p,
        params.repetition_penalty,
        params.seed,
        params.max_tokens,
        params.stop,
        params.ignore_eos,
    )


def sampling_from_wire(record: Sampling) -> SamplingParams:
    """A stage's parameters from the record; fields a host left open take the neutral values.
    Raises ``InvalidSamplingParams`` for values the sampler cannot use."""
    return SamplingParams(
        temperature=0.0 if record.temperature is None else record.temperature,
        top_k=record.top_k or 0,
        top_p=record.top_p if record.top_p else 1.0,
        min_p=record.min_p,
        repetition_penalty=record.repetition_penalty,
        seed=record.seed,
        max_tokens=record.max_tokens or 1,
        stop=record.stop,
        ignore_eos=record.ignore_eos,
    )
