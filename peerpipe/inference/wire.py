"""Tensors to and from the wire, in the model's own dtype (bf16 travels as its bit patterns), and
sampling parameters to and from their wire record."""

from __future__ import annotations

import numpy as np
import torch

from peerpipe.engine.sampling import SamplingParams
from peerpipe.protocol import Sampling, TensorData

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
