"""Tensors to and from the wire, in the model's own dtype (bf16 travels as its bit patterns)."""

from __future__ import annotations

import numpy as np
import torch

from peerpipe.protocol import TensorData

_AS_WIRE = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
}
_FROM_WIRE = {name: dtype for dtype, name in _AS_WIRE.items()}


def to_wire(t: torch.Tensor) -> TensorData:
    name = _AS_WIRE.get(t.dtype)
    if name is None:
        raise TypeError(f"no wire form for {t.dtype}")
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return TensorData.from_numpy(t.view(torch.int16).numpy().view(np.uint16), dtype="bfloat16")
    return TensorData.from_numpy(t.numpy())


def from_wire(data: TensorData, device: torch.device) -> torch.Tensor:
    dtype = _FROM_WIRE.get(data.dtype)
    if dtype is None:
        raise TypeError(f"unexpected tensor dtype {data.dtype} on the data plane")
    # A copy: the wire buffer belongs to the received frame, and torch wants writable memory.
    t = torch.from_numpy(np.array(data.to_numpy(), copy=True))
    if dtype == torch.bfloat16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.to(device, non_blocking=True)
