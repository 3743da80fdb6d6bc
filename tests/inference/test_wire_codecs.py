"""Hidden states on the wire: 16-bit, int8 and fp8 forms, their error bounds, their bytes, and the
choice of form per link."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peerpipe.inference.wire import encode_hidden, from_wire, ids_to_wire, to_wire
from peerpipe.plan import Link, ModelSpec
from peerpipe.plan.wire import WireChoiceError, bytes_per_token, choose_wire
from peerpipe.protocol import ComputeRequest, DecodeError, ValidationError, decode, encode
from peerpipe.protocol.tensor import TensorData, encoded_nbytes

CPU = torch.device("cpu")


def batch(seed: int, rows: int, width: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, width, generator=g) * scale
    x[:, :, 0] *= 50  # an outlier channel, as LLM hidden states have
    return x.to(dtype)


HIDDEN_STATES = dict(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 4),
    width=st.sampled_from([1, 7, 63, 64, 65, 128, 200, 384]),
    scale=st.sampled_from([1e-4, 1.0, 30.0, 3000.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)


def rows_back(x: torch.Tensor, wire: str, encoding: str):  # type: ignore[no-untyped-def]
    """Each row of ``x`` through ``wire`` and back: (original, decoded, its block's absmax), all
    [1, 3, W] in float32, after the checks every byte-per-value form shares."""
    encoded = encode_hidden(x, wire)
    assert len(encoded) == x.shape[0]
    width = x.shape[-1]
    for i, data in enumerate(encoded):
        assert data.encoding == encoding and data.shape == (1, 3, width)
        assert len(data.data) == encoded_nbytes(data.dtype, data.shape, encoding)
        back = from_wire(data, CPU)
        assert back.dtype == x.dtype and back.shape == (1, 3, width)
        original = x[i : i + 1].float()
        blocks = math.ceil(width / 64)
        padded = torch.nn.functional.pad(original.reshape(3, width), (0, blocks * 64 - width)).view(3, blocks, 64)
        absmax = padded.abs().amax(-1).repeat_interleave(64, -1)[:, :width].view(1, 3, width)
        yield original, back.float(), absmax


def own_rounding(dtype: torch.dtype) -> float:
    return 2**-8 if dtype == torch.bfloat16 else 2**-11


@settings(max_examples=120, deadline=None)
@given(**HIDDEN_STATES)
def test_int8_rows_come_back_within_half_a_step_of_their_block(seed, rows, width, scale, dtype) -> None:
    x = batch(seed, rows, width, scale, dtype)
    assume(bool(torch.isfinite(x).all()))  # float16 cannot hold the largest outliers
    for original, back, absmax in rows_back(x, "int8", "q8b64"):
        # Half a quantization step, the float16 rounding of the scale, and the dtype's own rounding.
        step = (absmax / 127 * (1 + 2**-10) + 2**-24) * (1 + 2**-10)  # the scale, rounded up to a float16
        bound = step / 2 + original.abs() * own_rounding(dtype) * 1.01 + 2**-24
        assert bool(((back - original).abs() <= bound + 1e-30).all())


@settings(max_examples=120, deadline=None)
@given(**HIDDEN_STATES)
def test_fp8_rows_come_back_within_e4m3s_relative_step(seed, rows, width, scale, dtype) -> None:
    x = batch(seed, rows, width, scale, dtype)
    assume(bool(torch.isfinite(x).all()))
    for original, back, absmax in rows_back(x, "fp8", "f8b64"):
        block_scale = (absmax / 448 * (1 + 2**-10) + 2**-24) * (1 + 2**-10)
        # Three mantissa bits: half a step is 2**-4 of the value; below e4m3's smallest normal
        # (2**-6) the step is fixed at 2**-9 of the scale.
        bound = original.abs() * (2**-4 + own_rounding(dtype) * 1.01) + block_scale * 2**-10 + 2**-24
        assert bool(((back - original).abs() <= bound + 1e-30).all())


def test_fp8_keeps_the_small_values_of_a_block_that_int8_flattens() -> None:
    x = torch.tensor([[[100.0] + [0.01 * (i + 1) for i in range(63)]]])
    int8 = from_wire(encode_hidden(x, "int8")[0], CPU)
    fp8 = from_wire(encode_hidden(x, "fp8")[0], CPU)
    small = slice(1, 40)  # values under half an int8 step (100 / 127 / 2) all round to zero in int8
    assert bool((int8[0, 0, small] == 0).all())
    assert bool(((fp8[0, 0, small] - x[0, 0, small]).abs() <= x[0, 0, small].abs() * 2**-4 + 1e-6).all())


@pytest.mark.parametrize(("wire", "dtype", "rel"), [("bf16", torch.bfloat16, 2**-8), ("fp16", torch.float16, 2**-11)])
def test_sixteen_bit_forms_round_like_their_dtype(wire: str, dtype: torch.dtype, rel: float) -> None:
    x = batch(1, 2, 384, 3.0, torch.float32)
    for i, data in enumerate(encode_hidden(x, wire)):
        assert data.dtype == str(dtype).removeprefix("torch.") and data.encoding == "raw"
        back = from_wire(data, CPU).float()
        assert bool(((back - x[i : i + 1]).abs() <= x[i : i + 1].abs() * rel).all())


def test_the_native_form_is_exact_and_int8_is_about_a_quarter_of_fp32() -> None:
    x = batch(2, 1, 384, 1.0, torch.float32)
    native = encode_hidden(x, "")[0]
    assert torch.equal(from_wire(native, CPU), x)
    int8 = encode_hidden(x, "int8")[0]
    assert len(int8.data) / len(native.data) == pytest.approx((384 + 12) / (384 * 4))


def test_all_zero_and_constant_rows_survive() -> None:
    for x in (torch.zeros(1, 2, 100), torch.full((1, 2, 100), -7.5)):
        back = from_wire(encode_hidden(x, "int8")[0], CPU)
        assert torch.allclose(back, x, atol=7.5 * 2e-3)


def test_an_int8_tensor_crosses_the_codec_and_a_corrupt_one_is_refused() -> None:
    data = encode_hidden(batch(3, 1, 130, 2.0, torch.bfloat16), "int8")[0]
    message = ComputeRequest("t1", data, plan_version=2, start_pos=5, layer=3)
    back = decode(encode(message))
    assert back.input_tensor.encoding == "q8b64" and bytes(back.input_tensor.data) == bytes(data.data)
    frame = bytearray(encode(message))
    frame[-5] ^= 0xFF  # a flipped scale byte
    with pytest.raises(DecodeError, match="corrupt"):
        decode(bytes(frame))


@pytest.mark.parametrize("encoding", ["q8b64", "f8b64"])
def test_a_byte_per_value_is_only_for_floats(encoding: str) -> None:
    with pytest.raises(ValidationError, match="float tensors"):
        TensorData("int64", (1, 4), b"\0" * encoded_nbytes("int64", (1, 4), encoding), encoding)
    data = encode_hidden(torch.ones(1, 1, 8), "int8")[0]
    with pytest.raises(ValidationError, match="decoded by its codec"):
        data.to_numpy()


@pytest.mark.parametrize("encoding", ["q8b64", "f8b64"])
@pytest.mark.parametrize("shape", [(), (1, 0), (1, 2, 0)])
def test_a_block_encoded_tensor_without_values_in_a_row_is_refused(encoding: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValidationError, match="rows of at least one value"):
        TensorData("float32", shape, b"\0" * encoded_nbytes("float32", shape, encoding), encoding)


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 4)])
def test_a_compute_request_carries_token_ids_or_hidden_states_only(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValidationError, match="must have 2 or 3 dimensions"):
        ComputeRequest("t1", TensorData("float32", shape, bytes(16)), plan_version=1, start_pos=0, layer=0)


# -- which form each link gets ----------------------------------------------------------------

AUSTEN = ModelSpec("austen", 6, 1, 1, 1, 1, 384 * 4, 1, dtype_bytes=4)  # fp32 hidden states, 384 wide
LLAMA8B = ModelSpec("8b", 32, 1, 1, 1, 1, 4096 * 2, 1, dtype_bytes=2)  # bf16, 4096 wide
MIB = 2**20


@pytest.mark.parametrize(
    ("model", "mib_per_s", "requested", "wire"),
    [
        (AUSTEN, 2000, "auto", ""),  # loopback: the codec costs more than the bytes it saves
        (AUSTEN, 300, "auto", ""),  # a busy machine's loopback
        (AUSTEN, 100e6 / 8 / MIB, "auto", "int8"),  # 100 Mbit/s
        (AUSTEN, 1e9 / 8 / MIB, "auto", "int8"),  # gigabit: 1.1 KB saved per token of a small model
        (LLAMA8B, 2000, "auto", ""),
        (LLAMA8B, 100e6 / 8 / MIB, "auto", "int8"),
        (LLAMA8B, 10e9 / 8 / MIB, "auto", ""),  # 10 GbE
        (LLAMA8B, 1e9 / 8 / MIB, "auto", ""),  # gigabit: 1 byte saved per value of a bf16 model is not worth it
        (AUSTEN, 2000, "int8", "int8"),  # asked for: every link
        (AUSTEN, 2000, "fp8", "fp8"),
        (AUSTEN, 1, "auto", "int8"),  # auto never picks fp8
        (AUSTEN, 1, "native", ""),
        (AUSTEN, 1, "bf16", "bf16"),
    ],
)
def test_each_link_gets_int8_where_its_bandwidth_makes_it_pay(model, mib_per_s, requested, wire) -> None:
    assert choose_wire(model, Link(0.1, mib_per_s * MIB), requested) == wire


def test_bytes_per_token_of_each_form() -> None:
    assert bytes_per_token(AUSTEN, "") == 1536 and bytes_per_token(AUSTEN, "bf16") == 768
    assert bytes_per_token(AUSTEN, "int8") == 384 + 12 == bytes_per_token(AUSTEN, "fp8")
    with pytest.raises(WireChoiceError, match="auto, native"):
        choose_wire(AUSTEN, Link(0.1, 1e6), "int4")


def test_numpy_payload_is_int8_values_then_float16_scales() -> None:
    x = torch.tensor([[[1.0] * 64 + [-2.0] * 64]])
    data = encode_hidden(x, "int8")[0]
    raw = np.frombuffer(data.data, dtype=np.uint8)
    q, scales = raw[:128].view(np.int8), raw[128:].view(np.float16)
    assert list(q[:2]) == [127, 127] and q[64] == -127
    assert scales.tolist() == pytest.approx([1 / 127, 2 / 127], rel=1e-3)


def test_processes_of_one_machine_keep_the_models_dtype_whatever_their_loopback_measured() -> None:
    from peerpipe.cluster.planning import same_machine, wire_formats
    from peerpipe.plan import Network

    addresses = {"h": "127.0.0.1:7000", "m0": "127.0.0.1:7001", "lan": "192.168.1.5:7000", "lan2": "192.168.1.5:7100",
                 "far": "192.168.1.9:7000"}
    slow = Link(0.2, 50 * MIB)  # a busy machine's loopback can measure this low
    network = Network({(a, b): slow for a in addresses for b in addresses if a != b})
    local = same_machine(addresses)
    assert local("h", "m0") and local("lan", "lan2") and not local("lan", "far") and not local("h", "far")
    assert wire_formats(["h", "m0", "far"], AUSTEN, network, "auto", local) == ["", "int8", ""]
    assert wire_formats(["lan", "lan2"], AUSTEN, network, "auto", local) == ["", ""]
    assert wire_formats(["h", "m0"], AUSTEN, network, "int8", local) == ["int8", ""]  # asked for: even so
    assert wire_formats(["h", "far"], AUSTEN, Network(), "auto", local) == ["", ""]  # not measured yet


@pytest.mark.parametrize("ids", [[0], [7, 2**40, -1], list(range(9))])
def test_token_ids_made_without_torch_equal_a_tensors_wire_form(ids: list[int]) -> None:
    for shape, tensor in (((len(ids),), torch.tensor(ids)), ((1, len(ids)), torch.tensor([ids]))):
        made, reference = ids_to_wire(ids, shape), to_wire(tensor)
        assert (made.dtype, made.shape, bytes(made.data)) == (reference.dtype, reference.shape, bytes(reference.data))
        assert from_wire(made, torch.device("cpu")).tolist() == tensor.tolist()


@pytest.mark.parametrize(
    ("nodes", "host", "wire", "formats"),
    [
        (["a", "b"], "a", "auto", ["local", "local"]),  # the host holds the first stage
        (["a", "b"], "b", "auto", ["local", "local"]),  # ... or the last
        (["a", "b", "c"], "h", "auto", ["local", "local", "local"]),  # or none, on the same machine
        (["a", "b"], "far", "auto", ["local", ""]),  # a host elsewhere gets its tokens on the channel
        (["a", "far"], "a", "auto", ["", ""]),  # so does a last stage elsewhere
        (["far", "a"], "a", "auto", ["", ""]),  # and one whose first stage could not read them
        (["a"], "a", "auto", ["local"]),  # a room of one: its stage feeds itself
        (["a", "b"], "a", "native", ["", ""]),  # asked for the channel
        (["a", "b"], "", "auto", ["local", ""]),  # no host named
    ],
)
def test_the_last_stage_sends_tokens_ahead_only_where_host_and_first_stage_share_its_memory(
    nodes: list[str], host: str, wire: str, formats: list[str]
) -> None:
    from peerpipe.cluster.planning import wire_formats
    from peerpipe.plan import Network

    def shared(x: str, y: str) -> bool:
        return "far" not in (x, y)

    assert wire_formats(nodes, AUSTEN, Network(), wire, shared=shared, host=host) == formats
