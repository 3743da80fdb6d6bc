"""Cluster membership as a pure reducer: ``reduce(view, event, config) -> view``.

Nothing here reads a clock or a socket: every event carries ``now``, so tests drive time by
hand and the host's service is a thin loop feeding events in. ``epoch`` grows whenever who is
in the room, or whether they look alive, changes; load reports alone do not move it.

A member is *alive* while its heartbeats arrive, *suspected* after ``suspect_after_beats``
missed beats, and removed (dead) after ``dead_after_s`` without one. A member that says goodbye,
or whose connection drops, is removed at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from peerpipe.protocol import NodeInfo


@dataclass(frozen=True)
class MembershipConfig:
    heartbeat_s: float = 1.0
    suspect_after_beats: int = 3
    dead_after_s: float = 6.0

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.suspect_after_beats < 1:
            raise ValueError("heartbeat_s must be positive and suspect_after_beats at least 1")
        if self.dead_after_s <= self.suspect_s:
            raise ValueError(
                f"dead_after_s ({self.dead_after_s:g} s) must exceed the suspicion time ({self.suspect_s:g} s)"
            )

    @property
    def suspect_s(self) -> float:
        return self.heartbeat_s * self.suspect_after_beats


@dataclass(frozen=True)
class MemberRecord:
    info: NodeInfo
    joined_at: float
    last_beat: float
    load: float = 0.0
    status: str = "idle"
    suspected: bool = False
    steps: int = 0
    compute_s: float = 0.0

    @property
    def health(self) -> str:
        return "suspected" if self.suspected else "alive"


@dataclass(frozen=True)
class ClusterView:
    epoch: int = 0
    members: tuple[MemberRecord, ...] = ()  # in order of joining

    def get(self, node_id: str) -> MemberRecord | None:
        return next((m for m in self.members if m.info.node_id == node_id), None)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.info.node_id for m in self.members)

    def alive(self) -> tuple[MemberRecord, ...]:
        return tuple(m for m in self.members if not m.suspected)


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Joined:
    info: NodeInfo
    now: float


@dataclass(frozen=True)
class Left:
    """Said goodbye (leave-cluster or bye)."""

    node_id: str
    now: float


@dataclass(frozen=True)
class Lost:
    """The connection dropped without a goodbye."""

    node_id: str
    now: float


@dataclass(frozen=True)
class Beat:
    node_id: str
    load: float
    status: str
    now: float
    steps: int = 0
    compute_s: float = 0.0


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class HostAway:
    """The host's own loop stood still for ``seconds`` (stopped, swapped out, starved): members'
    beats sat unread meanwhile, so their silence during it does not count."""

    seconds: float


Event = Joined | Left | Lost | Beat | Tick | HostAway


def reduce(view: ClusterView, event: Event, config: MembershipConfig) -> ClusterView:
    if isinstance(event, Joined):
        node_id = event.info.node_id
        old = view.get(node_id)
        record = MemberRecord(event.info, old.joined_at if old else event.now, event.now)
        members = tuple(record if m.info.node_id == node_id else m for m in view.members)
        if old is None:
            members += (record,)
        return ClusterView(view.epoch + 1, members)
    if isinstance(event, Left | Lost):
        if view.get(event.node_id) is None:
            return view
        return ClusterView(view.epoch + 1, tuple(m for m in view.members if m.info.node_id != event.node_id))
    if isinstance(event, Beat):
        old = view.get(event.node_id)
        if old is None:
            return view  # a beat from someone who has not joined (or was declared dead) is ignored
        new = dataclasses.replace(
            old,
            last_beat=event.now,
            load=event.load,
            status=event.status,
            suspected=False,
            steps=event.steps,
            compute_s=event.compute_s,
        )
        members = tuple(new if m is old else m for m in view.members)
        return ClusterView(view.epoch + old.suspected, members)
    if isinstance(event, HostAway):
        members = tuple(dataclasses.replace(m, last_beat=m.last_beat + event.seconds) for m in view.members)
        return ClusterView(view.epoch, members)
    return _tick(view, event.now, config)


def _tick(view: ClusterView, now: float, config: MembershipConfig) -> ClusterView:
    changed = False
    members = []
    for m in view.members:
        silent = now - m.last_beat
        if silent > config.dead_after_s:
            changed = True
            continue
        suspected = silent > config.suspect_s
        if suspected != m.suspected:
            m = dataclasses.replace(m, suspected=suspected)
            changed = True
        members.append(m)
    return ClusterView(view.epoch + 1, tuple(members)) if changed else view


def unique_names(names: dict[str, str]) -> dict[str, str]:
    """Nodes by name, told apart by their id where two share one (nodes of one machine take its
    host name unless given --name)."""
    taken = list(names.values())
    return {i: f"{n}-{i[:4]}" if taken.count(n) > 1 else n for i, n in names.items()}
