"""int8 one-row products launched as programmatic dependents (int8_gluon.overlaps): each one's
programs start while the kernel before ends and must wait for it before reading what it wrote.
A chain in which every kernel reads the one before's output, replayed from a CUDA graph on new
inputs, gives bit for bit what the same chain launched one after another gives; a kernel that
read early would see the last replay's values. Skipped without a Hopper GPU and Triton's Gluon."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from peerpipe.engine import argmax_cuda, attention_cuda, bf16_gluon, int8_gluon
from peerpipe.engine.normed import normed_linear
from peerpipe.engine.quant import quantize

hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or bf16_gluon._kernel() is None
    or int8_gluon._kernels() is None,
    reason="needs a Hopper GPU and Triton's Gluon",
)

K, FF, LAYERS, VOCAB = 1024, 4096, 6, 32000


def _weights() -> dict[str, list]:
    torch.manual_seed(0)

    def mat(n: int, k: int = K) -> torch.Tensor:
        return torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5

    def int8(n: int, k: int = K) -> list:
        return [quantize(mat(n, k), "int8") for _ in range(LAYERS)]

    return dict(
        norms=[(torch.rand(2, K, device="cuda") + 0.5).to(torch.bfloat16) for _ in range(LAYERS)],
        qkv=int8(K),
        o=[mat(K) for _ in range(LAYERS)],
        glu=int8(2 * FF),
        down=int8(K, FF),  # long K: the int8 kernel splits it (workspace and counters)
        keys=[torch.randn(1, 8, 256, K // 32, device="cuda", dtype=torch.bfloat16) for _ in range(2)],
        head=[mat(VOCAB)],
    )


def _step(x: torch.Tensor, w: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's kernels in their order, each reading the one before's output: per layer
    the normed q|k|v product (int8), attention over a cache, the o product (bf16), the normed
    gate|up (int8) and the down product (int8, split along K); then the head and the token."""
    h, delta = x, None
    mask = torch.zeros(1, 1, 1, 256, device="cuda", dtype=torch.bfloat16)
    keys, values = w["keys"]
    for layer in range(LAYERS):
        norms = w["norms"][layer]
        h, y = normed_linear(h, delta, norms[0], 1e-5, w["qkv"][layer])
        y = attention_cuda.decode_attention(y.view(1, 8, 4, K // 32), keys, values, mask, 0.2).view(1, K)
        h, y = normed_linear(h, bf16_gluon.gemv(y, w["o"][layer]), norms[1], 1e-5, w["glu"][layer], glu=True)
        down = w["down"][layer]
        delta = int8_gluon.gemv(y, down.q, down.scale)
    logits = bf16_gluon.gemv(h + delta, w["head"][0])
    return logits, argmax_cuda.argmax(logits)


def _graphed(w: dict[str, list], overlap: bool, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    asked, int8_gluon.overlap = int8_gluon.overlap, overlap
    try:
        x = inputs[0].clone()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            _step(x, w)  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, token = _step(x, w)
        out = []
        for new in inputs:
            x.copy_(new)
            graph.replay()
            out.append(torch.cat((logits.float().flatten(), token.float())))
        return out
    finally:
        int8_gluon.overlap = asked


@hopper
def test_a_graph_of_dependent_launches_reads_each_kernels_output_after_it_is_written() -> None:
    assert bf16_gluon.prepare(torch.device("cuda")) and attention_cuda.prepare(torch.device("cuda"))
    w = _weights()
    inputs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16) * (1 + i) for i in range(12)]
    apart = _graphed(w, False, inputs)
    overlapped = _graphed(w, True, inputs)
    for i, (a, b) in enumerate(zip(apart, overlapped, strict=True)):
        assert torch.equal(a, b), f"replay {i} differs"
    assert len({int(a[-1]) for a in apart}) > 1  # the inputs change the token: stale reads would show
    assert int8_gluon.choose(K, FF, 1)[2] > 1  # the down product did split along K


def test_launches_overlap_unless_turned_off_or_the_matrix_is_large() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cuda, small = torch.device("cuda"), int8_gluon.dependent_below - 1
    asked = int8_gluon.overlap
    try:
        int8_gluon.overlap = False
        assert not int8_gluon.overlaps(cuda)
        assert int8_gluon.launch_options(cuda, small) == dict(PDL=False)
        int8_gluon.overlap = True
        hopper_gpu = torch.cuda.get_device_capability() >= (9, 0)
        assert int8_gluon.overlaps(cuda) == hopper_gpu
        assert int8_gluon.launch_options(cuda, small) == (dict(PDL=True, launch_pdl=True) if hopper_gpu else dict(PDL=False))
        assert int8_gluon.launch_options(cuda, int8_gluon.dependent_below) == dict(PDL=False)
    finally:
        int8_gluon.overlap = asked


def test_the_environment_turns_overlap_and_the_norm_prologue_off() -> None:
    code = "from peerpipe.engine import int8_gluon, normed; print(int8_gluon.overlap, normed.enabled)"
    cases = ((None, None, "True True"), ("0", "1", "False True"), ("1", "0", "True False"))
    for pdl, prologue, want in cases:
        env = {k: v for k, v in os.environ.items() if k not in ("PEERPIPE_PDL", "PEERPIPE_NORM_PROLOGUE")}
        env |= {k: v for k, v in (("PEERPIPE_PDL", pdl), ("PEERPIPE_NORM_PROLOGUE", prologue)) if v is not None}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, (pdl, prologue)
