"""Hypothesis strategies that build every protocol message with random valid fields."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import strategies as st

from peerpipe import protocol as p
from peerpipe.protocol.tensor import ITEMSIZE, chunk_span, encoded_nbytes

ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=128)
names = st.text(st.characters(codec="utf-8"), max_size=64)
texts = st.text(max_size=200)
u64 = st.integers(0, (1 << 64) - 1)
nonneg = st.floats(0.0, 1e12, allow_nan=False, allow_infinity=False)


@st.composite
def tensors(draw: st.DrawFn, max_elems: int = 64, ranks: tuple[int, int] = (0, 4)) -> p.TensorData:
    dtype = draw(st.sampled_from(sorted(p.DTYPES)))
    ndim = draw(st.integers(*ranks))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    if math.prod(shape) > max_elems:
        shape = (1,) * (ndim - 1) + (max_elems,)
    # Float tensors may travel a byte per value with block scales (int8 or float8).
    floats = dtype in ("float32", "float16", "bfloat16")
    blocks = floats and shape and shape[-1] > 0  # a block-scaled row has at least one value
    encoding = draw(st.sampled_from(["raw", "q8b64", "f8b64"])) if blocks else "raw"
    nbytes = encoded_nbytes(dtype, shape, encoding)
    return p.TensorData(dtype, shape, draw(st.binary(min_size=nbytes, max_size=nbytes)), encoding)


node_infos = st.builds(
    p.NodeInfo,
    node_id=ids,
    name=names,
    device=st.sampled_from(["cpu", "cuda", "mps", "wgpu"]),
    memory_bytes=st.integers(0, 1 << 45),
    tflops=nonneg,
    supports_f16=st.booleans(),
    memory_bandwidth_gbps=nonneg,
    address=names,
    device_name=names,
    memory_total_bytes=st.integers(0, 1 << 45),
    tflops_half=nonneg,
    latency_ms=nonneg,
    supports_bf16=st.booleans(),
    cpu_cores=st.integers(0, 512),
    ram_bytes=st.integers(0, 1 << 45),
    gpu=st.text(st.characters(codec="ascii"), max_size=64),
    cpus=st.text("0123456789abcdef", max_size=64),
)
timings = st.builds(
    p.LayerTiming,
    shape_key=ids,
    dtype=st.sampled_from(["float32", "bfloat16"]),
    decode_ms=nonneg,
    prefill_ms=nonneg,
    prefill_tokens=st.integers(1, 4096),
    layer_bytes=st.integers(0, 1 << 40),
    stage_overhead_ms=nonneg,
)
links = st.builds(p.LinkStat, src=ids, dst=ids, rtt_ms=nonneg, mib_per_s=nonneg)
member_states = st.builds(
    p.MemberState,
    info=node_infos,
    health=st.sampled_from(["alive", "suspected"]),
    status=st.sampled_from(sorted(p.HEARTBEAT_STATUSES)),
    load=st.floats(0.0, 1.0),
    heartbeat_age_ms=nonneg,
    timing=st.none() | timings,
)


samplings = st.builds(
    p.Sampling,
    temperature=st.none() | st.floats(0, 5),
    top_k=st.none() | st.integers(0, 100),
    top_p=st.none() | st.floats(0, 1),
    min_p=st.floats(0, 1),
    repetition_penalty=st.floats(0.5, 2),
    seed=st.none() | u64,
    max_tokens=st.none() | st.integers(1, 4096),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    ignore_eos=st.booleans(),
)
session_specs = st.builds(p.SessionSpec, sampling=samplings, history=st.none() | tensors())


@st.composite
def plans(draw: st.DrawFn) -> p.Plan:
    cuts = sorted(set(draw(st.lists(st.integers(1, 99), max_size=6))))
    num_layers = draw(st.integers((cuts[-1] + 1) if cuts else 1, 100))
    bounds = [0, *cuts, num_layers]
    stages = tuple(
        p.PlanStage(draw(ids), a, b, draw(st.floats(0.0, 1e6)), wire=draw(st.sampled_from(["", "bf16", "int8", "fp8"])),
                    quantize=draw(st.sampled_from(["", "none", "int8", "int4"])))
        for a, b in itertools.pairwise(bounds)
    )
    spares = tuple(
        p.PlanStage(f"spare-{s.node_id}", s.start, s.end) for s in stages if draw(st.booleans())
    )
    return p.Plan(draw(u64), draw(ids), num_layers, stages, draw(nonneg), spares, draw(st.integers(0, len(stages))))


@st.composite
def chunks(draw: st.DrawFn) -> p.TensorChunk:
    total_bytes = draw(st.integers(1, 300))
    total_chunks = draw(st.integers(1, total_bytes))
    size = -(-total_bytes // total_chunks)
    # Only counts whose last chunk is non-empty are valid; fall back to the count implied by size.
    total_chunks = -(-total_bytes // size)
    index = draw(st.integers(0, total_chunks - 1))
    start, end = chunk_span(index, total_chunks, total_bytes)
    data = draw(st.binary(min_size=end - start, max_size=end - start))
    return p.TensorChunk(draw(ids), index, total_chunks, total_bytes, data)


compute_requests = st.builds(
    p.ComputeRequest,
    task_id=ids,
    input_tensor=tensors(ranks=(2, 3)),  # token ids or hidden states
    session_id=names,
    plan_version=u64,
    start_pos=st.integers(0, 1 << 40),
    session=st.none() | session_specs,
    layer=st.integers(0, 1 << 20),
    drafts=st.lists(st.integers(0, 1 << 20), max_size=64).map(tuple),
    partial=st.booleans(),
)
compute_results = st.builds(
    p.ComputeResult, task_id=ids, output_tensor=tensors(), plan_version=u64, start_pos=st.integers(0, 1 << 40)
)

STRATEGIES: dict[type, st.SearchStrategy] = {
    p.Hello: st.builds(
        p.Hello,
        protocol_version=st.integers(1, 0xFFFF),
        node_id=ids,
        name=names,
        software=names,
        features=st.lists(st.text(min_size=1, max_size=20), max_size=5).map(tuple),
    ),
    p.Ping: st.builds(p.Ping, nonce=u64, payload=st.binary(max_size=64)),
    p.Pong: st.builds(p.Pong, nonce=u64),
    p.Bye: st.builds(p.Bye, reason=texts),
    p.JoinCluster: st.builds(p.JoinCluster, node_info=node_infos),
    p.LeaveCluster: st.builds(p.LeaveCluster, peer_id=ids),
    p.NewCode: st.builds(p.NewCode, code=texts),
    p.Heartbeat: st.builds(
        p.Heartbeat, load=st.floats(0.0, 1.0), status=st.sampled_from(sorted(p.HEARTBEAT_STATUSES))
    ),
    p.RoomView: st.builds(
        p.RoomView,
        epoch=u64,
        members=st.lists(member_states, max_size=4, unique_by=lambda m: m.info.node_id).map(tuple),
        plan=st.none() | plans(),
        acked=st.lists(ids, max_size=3).map(tuple),
        links=st.lists(links, max_size=3).map(tuple),
        heartbeat_s=st.floats(0.01, 3600.0),
        tasks=st.lists(
            st.builds(
                p.TaskInfo,
                task_id=ids,
                status=st.sampled_from(["queued", "decoding", "failed"]),
                prompt_tokens=st.integers(0, 1000),
                tokens=st.integers(0, 1000),
                tok_s=nonneg,
                error=texts,
            ),
            max_size=2,
        ).map(tuple),
        measured_ms=nonneg,
    ),
    p.DistributionPlan: st.builds(
        p.DistributionPlan,
        plan=plans(),
        shape_key=names,
        dtype=st.sampled_from(["", "float32", "bfloat16"]),
        context_tokens=st.integers(0, 1 << 20),
        sessions=st.integers(0, 64),
        manifest_id=names,
        prefetch=st.booleans(),
    ),
    p.PlanAck: st.builds(p.PlanAck, version=u64, ok=st.booleans(), error=texts, prefetched=st.booleans()),
    p.BenchmarkRequest: st.builds(
        p.BenchmarkRequest,
        request_id=u64,
        model_shape=texts,
        dtype=st.sampled_from(["", "float32", "bfloat16"]),
        links_to=st.lists(ids, max_size=3).map(tuple),
        fresh=st.booleans(),
        manifest_id=names,
    ),
    p.BenchmarkResult: st.builds(
        p.BenchmarkResult,
        score=nonneg,
        request_id=u64,
        matmul_tflops=nonneg,
        memory_bandwidth_gbps=nonneg,
        latency_ms=nonneg,
        timing=st.none() | timings,
        links=st.lists(links, max_size=3).map(tuple),
        error=texts,
        held_layers=st.lists(st.integers(0, 1 << 20), max_size=4).map(tuple),
    ),
    p.ComputeRequest: compute_requests,
    p.ComputeResult: compute_results,
    p.ComputeBatch: st.builds(
        p.ComputeBatch,
        requests=st.lists(compute_requests, min_size=1, max_size=3).map(tuple),
        results=st.lists(compute_results, max_size=3).map(tuple),
    ),
    p.ComputeError: st.builds(
        p.ComputeError, task_id=ids, error=texts, plan_version=u64, start_pos=st.integers(0, 1 << 40)
    ),
    p.Cancel: st.builds(p.Cancel, task_id=ids),
    p.TensorChunk: chunks(),
    p.GenerateRequest: st.builds(
        p.GenerateRequest,
        request_id=ids,
        prompt=texts,
        sampling=samplings,
        chat=st.booleans(),
        system=texts,
        prompt_ids=st.lists(st.integers(0, 1 << 20), max_size=5).map(tuple),
        wait_s=st.floats(0.0, 86400.0),
        speculate=st.sampled_from(["", "off", "ngram", "draft"]),
    ),
    p.GenerateText: st.builds(p.GenerateText, request_id=ids, text=texts),
    p.GenerateDone: st.builds(
        p.GenerateDone,
        request_id=ids,
        finish_reason=st.sampled_from(["stop", "length", "cancelled", "error"]),
        text=texts,
        tokens=st.lists(st.integers(0, 1 << 20), max_size=8).map(tuple),
        prompt_ids=st.lists(st.integers(0, 1 << 20), max_size=8).map(tuple),
        prefill_s=nonneg,
        decode_s=nonneg,
        error=texts,
        stages=st.lists(names, max_size=3).map(tuple),
        speculate=st.sampled_from(["", "off", "ngram", "draft"]),
        steps=st.integers(0, 1 << 40),
        drafted=st.integers(0, 1 << 40),
        accepted=st.integers(0, 1 << 40),
    ),
    p.ManifestRequest: st.builds(p.ManifestRequest, request_id=u64, manifest_id=ids),
    p.ManifestReply: st.builds(p.ManifestReply, request_id=u64, data=st.binary(max_size=64), error=texts),
    p.WeightRequest: st.builds(
        p.WeightRequest, request_id=u64, manifest_id=ids, name=st.text(min_size=1, max_size=40),
        offset=st.integers(0, 1 << 48), length=st.integers(1, p.MAX_WEIGHT_PIECE),
    ),
    p.WeightReply: st.builds(
        p.WeightReply, request_id=u64, data=st.binary(max_size=64), error=st.text(max_size=100), busy=st.booleans()
    ),
}

messages = st.one_of(*STRATEGIES.values())


def numpy_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=math.prod(shape) * ITEMSIZE[dtype], dtype=np.uint8)
    if dtype == "bool":
        raw %= 2
    return raw.view(np.uint16 if dtype == "bfloat16" else dtype).reshape(shape)
