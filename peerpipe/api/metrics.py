"""Prometheus metrics in the text exposition format (version 0.0.4), with no client library.

Counters and histograms are kept here as requests finish; gauges about the room (nodes,
heartbeats, stages, tasks) are read from the host's view at scrape time, so they are never stale.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from peerpipe.engine.speculate import SpecStats
from peerpipe.inference.pipeline import RecoveryStats
from peerpipe.protocol import RoomView

Labels = tuple[tuple[str, str], ...]
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {_number(value)}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(buckets)
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[key] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, counts in sorted(self.counts.items()):
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                yield f"{self.name}_bucket{_labels((*labels, ('le', _number(bound))))} {count}"
            yield f"{self.name}_sum{_labels(labels)} {_number(self.sums[labels])}"
            yield f"{self.name}_count{_labels(labels)} {counts[-1]}"


def _gauge(name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> Iterable[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} gauge"
    for labels, value in samples:
        yield f"{name}{_labels(labels)} {_number(value)}"


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter("peerpipe_requests_total", "API requests answered, by endpoint and HTTP status.")
        self.answers = Counter("peerpipe_answers_total", "Answers ended, by finish reason (stop, length, cancelled, error).")
        self.prompt_tokens = Counter("peerpipe_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generated_tokens = Counter("peerpipe_generated_tokens_total", "Tokens generated for finished requests.")
        self.latency = Histogram("peerpipe_request_duration_seconds", "Time from request to last token.")
        self.ttft = Histogram("peerpipe_time_to_first_token_seconds", "Time from prompt to first token.")

    def totals(self) -> dict[str, int]:
        """What the dashboard's header shows, read off the counters."""
        answers = {dict(labels)["finish_reason"]: int(n) for labels, n in self.answers.values.items()}
        failed = answers.pop("error", 0)
        return {
            "answers": sum(answers.values()),
            "tokens": int(sum(self.generated_tokens.values.values())),
            "cancelled": answers.get("cancelled", 0),
            "failed": failed,
        }

    def render(
        self,
        view: RoomView | None,
        names: dict[str, str],
        recovery: RecoveryStats | None = None,
        speculation: SpecStats | None = None,
    ) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.answers, self.prompt_tokens, self.generated_tokens, self.latency, self.ttft):
            lines.extend(metric.render())
        if recovery is not None:
            lines.extend(_recovery_counters(recovery))
        if speculation is not None:
            lines.extend(_speculation_counters(speculation))
        if view is not None:
            lines.extend(_room_gauges(view, names))
        return "\n".join(lines) + "\n"


def _counters(rows: Iterable[tuple[str, str, float]]) -> Iterable[str]:
    for name, help_text, value in rows:
        yield f"# HELP {name} {help_text}"
        yield f"# TYPE {name} counter"
        yield f"{name} {_number(value)}"


def _recovery_counters(recovery: RecoveryStats) -> Iterable[str]:
    return _counters((
        ("peerpipe_failovers_total", "Times the stages under running answers went away.", recovery.failovers),
        ("peerpipe_resumed_answers_total", "Answers that resumed on a new plan after a failover.", recovery.stalls),
        ("peerpipe_replayed_tokens_total", "Positions prefilled again to rebuild lost KV caches.", recovery.replayed_tokens),
        ("peerpipe_stall_seconds_total", "Summed over resumed answers: last token before a loss to the first after.", recovery.stall_s),
    ))


def _speculation_counters(spec: SpecStats) -> Iterable[str]:
    return _counters((
        ("peerpipe_decode_steps_total", "Decode steps sent through the stages (each may carry drafts).", spec.steps),
        ("peerpipe_drafted_tokens_total", "Drafted tokens sent for the last stage to verify.", spec.drafted),
        ("peerpipe_accepted_tokens_total", "Drafted tokens the last stage kept.", spec.accepted),
        ("peerpipe_step_tokens_total", "Tokens the decode steps yielded (kept drafts plus one each).", spec.tokens),
    ))


def _room_gauges(view: RoomView, names: dict[str, str]) -> Iterable[str]:
    def node(node_id: str) -> Labels:
        return (("node", names.get(node_id, node_id[:8])), ("node_id", node_id))

    members = view.members
    yield from _gauge(
        "peerpipe_node_up",
        "1 for each node in the room; health is alive or suspected.",
        (((*node(m.info.node_id), ("health", m.health)), 1.0) for m in members),
    )
    yield from _gauge(
        "peerpipe_node_heartbeat_age_seconds",
        "Seconds since each node's last heartbeat.",
        ((node(m.info.node_id), m.heartbeat_age_ms / 1e3) for m in members),
    )
    yield from _gauge(
        "peerpipe_node_load", "Busy fraction of each node's device.", ((node(m.info.node_id), m.load) for m in members)
    )
    stages = {s.node_id: s for s in view.plan.stages} if view.plan else {}
    with_stage = [m for m in members if m.info.node_id in stages]

    def stage(m_id: str) -> Labels:
        s = stages[m_id]
        return (*node(m_id), ("layers", f"{s.start}-{s.end - 1}"))  # inclusive, as the dashboard shows

    # A summary's _sum and _count: rate(sum) / rate(count) is each stage's latency per forward.
    yield "# HELP peerpipe_stage_forward_seconds Time each stage spends in its forwards."
    yield "# TYPE peerpipe_stage_forward_seconds summary"
    for m in with_stage:
        yield f"peerpipe_stage_forward_seconds_sum{_labels(stage(m.info.node_id))} {_number(m.compute_s)}"
        yield f"peerpipe_stage_forward_seconds_count{_labels(stage(m.info.node_id))} {m.steps}"
    if view.plan is not None:
        yield from _gauge(
            "peerpipe_plan_predicted_seconds_per_token",
            "The planner's predicted time per token for the current plan.",
            [((("version", str(view.plan.version)),), view.plan.predicted_ms / 1e3)],
        )
    by_status: dict[str, int] = defaultdict(int)
    for task in view.tasks:
        by_status[task.status] += 1
    yield from _gauge(
        "peerpipe_tasks",
        "Requests in the room by status.",
        (((("status", s),), float(by_status.get(s, 0))) for s in ("queued", "prefill", "decoding")),
    )
    yield from _gauge(
        "peerpipe_link_rtt_seconds",
        "Measured round trip between two nodes.",
        (
            ((*node(link.src), ("peer", names.get(link.dst, link.dst[:8])), ("peer_id", link.dst)), link.rtt_ms / 1e3)
            for link in view.links
        ),
    )
