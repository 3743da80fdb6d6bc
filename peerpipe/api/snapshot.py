"""The room as the dashboard draws it: one JSON object built from the host's view."""

from __future__ import annotations

import time
from typing import Any

from peerpipe.protocol import MemberState, RoomView


def _node(m: MemberState, host_id: str, acked: set[str]) -> dict[str, Any]:
    info = m.info
    timing = m.timing
    return {
        "id": info.node_id,
        "name": info.name or info.node_id[:8],
        "host": info.node_id == host_id,
        "device": info.device,
        "device_name": info.device_name,
        "quantize": info.quantize,
        "memory_gb": round(info.memory_bytes / 1e9, 2),
        "memory_total_gb": round(info.memory_total_bytes / 1e9, 2),
        "tflops": round(info.tflops, 3),
        "tflops_half": round(info.tflops_half, 3),
        "gbps": round(info.memory_bandwidth_gbps, 1),
        "cpu_cores": info.cpu_cores,
        "address": info.address,
        "health": m.health,
        "status": m.status,
        "load": round(m.load, 3),
        "heartbeat_age_ms": round(m.heartbeat_age_ms, 1),
        "decode_ms_per_layer": round(timing.decode_ms, 4) if timing else None,
        "steps": m.steps,
        "ms_per_forward": round(m.compute_s * 1e3 / m.steps, 3) if m.steps else None,
        "loaded": info.node_id in acked,
    }


def room_snapshot(
    view: RoomView,
    *,
    host_id: str,
    code: str,
    model: dict[str, Any] | None,
    ready: bool,
    why_not_ready: str,
    totals: dict[str, int],
    recovery: dict[str, Any] | None = None,
    speculation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    names = {m.info.node_id: m.info.name or m.info.node_id[:8] for m in view.members}
    acked = set(view.acked)
    plan = None
    if view.plan is not None:
        plan = {
            "version": view.plan.version,
            "model": view.plan.model_id,
            "layers": view.plan.num_layers,
            "predicted_ms": round(view.plan.predicted_ms, 3),
            "measured_ms": round(view.measured_ms, 3) if view.measured_ms else None,
            "stages": [
                {
                    "node": s.node_id,
                    "name": names.get(s.node_id, s.node_id[:8]),
                    "start": s.start,
                    "end": s.end,
                    "loaded": s.node_id in acked,
                    "predicted_ms": round(s.predicted_ms, 3) if s.predicted_ms else None,
                    "wire": s.wire or "native",
                }
                for s in view.plan.stages
            ],
        }
    return {
        "time": time.time(),
        "code": code,
        "epoch": view.epoch,
        "model": model,
        "ready": ready,
        "why_not_ready": "" if ready else why_not_ready,
        "nodes": [_node(m, host_id, acked) for m in view.members],
        "plan": plan,
        "links": [
            {
                "src": link.src,
                "dst": link.dst,
                "src_name": names.get(link.src, link.src[:8]),
                "dst_name": names.get(link.dst, link.dst[:8]),
                "rtt_ms": round(link.rtt_ms, 3),
                "mib_per_s": round(link.mib_per_s, 1),
            }
            for link in view.links
        ],
        "tasks": [
            {
                "id": t.task_id,
                "status": t.status,
                "prompt_tokens": t.prompt_tokens,
                "tokens": t.tokens,
                "tok_s": round(t.tok_s, 2),
            }
            for t in view.tasks
        ],
        "totals": totals,
        "recovery": recovery,
        "speculation": speculation,
    }
