"""/metrics text: every sample line is well-formed Prometheus exposition, and room gauges follow the view."""

from __future__ import annotations

import re

from peerpipe.api.metrics import Metrics
from peerpipe.engine.speculate import SpecStats
from peerpipe.inference.pipeline import RecoveryStats
from peerpipe.protocol import LinkStat, MemberState, NodeInfo, Plan, PlanStage, RoomView, TaskInfo

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? (-?[0-9.e+-]+|\+Inf)$')


def view() -> RoomView:
    a = NodeInfo("a" * 32, 'pc "one"', "cuda", 8 << 30, 80.0)
    b = NodeInfo("b" * 32, "laptop", "cpu", 4 << 30, 1.0)
    plan = Plan(3, "m", 8, (PlanStage(a.node_id, 0, 6), PlanStage(b.node_id, 6, 8)), predicted_ms=12.5)
    members = (
        MemberState(a, heartbeat_age_ms=250.0, steps=10, compute_s=0.5),
        MemberState(b, health="suspected", heartbeat_age_ms=4000.0, steps=4, compute_s=0.2),
    )
    links = (LinkStat(a.node_id, b.node_id, 1.5, 100.0),)
    tasks = (TaskInfo("t1", "decoding", 5, 3, 9.0), TaskInfo("t2", "queued", 5, 0, 0.0))
    return RoomView(7, members, plan, (a.node_id, b.node_id), links, 1.0, tasks)


def test_exposition_is_well_formed_and_follows_the_view() -> None:
    m = Metrics()
    m.requests.inc(endpoint="/v1/chat/completions", status="200")
    m.latency.observe(0.3)
    m.latency.observe(7.0)
    text = m.render(view(), {"a" * 32: 'pc "one"', "b" * 32: "laptop"})
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all(SAMPLE.match(line) for line in samples), [s for s in samples if not SAMPLE.match(s)]
    assert re.search(r'peerpipe_node_up\{node="laptop",node_id="b+",health="suspected"\} 1\n', text)
    assert 'node="pc \\"one\\""' in text  # quotes escaped
    assert 'peerpipe_request_duration_seconds_bucket{le="0.5"} 1' in text
    assert 'peerpipe_request_duration_seconds_bucket{le="+Inf"} 2' in text
    assert "peerpipe_request_duration_seconds_count 2" in text
    assert re.search(r'peerpipe_stage_forward_seconds_count\{node="laptop",node_id="b+",layers="6-7"\} 4', text)
    assert 'peerpipe_tasks{status="decoding"} 1' in text and 'peerpipe_tasks{status="queued"} 1' in text
    assert re.search(r'peerpipe_node_heartbeat_age_seconds\{node="laptop",node_id="b+"\} 4\b', text)
    assert "peerpipe_plan_predicted_seconds_per_token" in text


def test_speculation_counters_follow_the_room() -> None:
    text = Metrics().render(view(), {}, None, SpecStats("ngram", steps=10, drafted=30, accepted=12, tokens=22))
    assert "peerpipe_decode_steps_total 10\n" in text and "peerpipe_drafted_tokens_total 30\n" in text
    assert "peerpipe_accepted_tokens_total 12\n" in text and "peerpipe_step_tokens_total 22\n" in text


def test_failover_counters_follow_the_pipeline() -> None:
    text = Metrics().render(view(), {}, RecoveryStats(failovers=2, replayed_tokens=130, stall_s=1.5, stalls=3))
    assert "peerpipe_failovers_total 2\n" in text and "peerpipe_replayed_tokens_total 130\n" in text
    assert "peerpipe_stall_seconds_total 1.5\n" in text and "peerpipe_resumed_answers_total 3\n" in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(SAMPLE.match(line) for line in samples)
