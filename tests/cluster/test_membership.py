"""Membership reducer, driven by a hand-held clock."""

from __future__ import annotations

import pytest

from peerpipe.cluster.membership import (
    Beat,
    ClusterView,
    HostAway,
    Joined,
    Left,
    Lost,
    MembershipConfig,
    Tick,
    reduce,
)
from peerpipe.protocol import NodeInfo

CFG = MembershipConfig(heartbeat_s=1.0, suspect_after_beats=3, dead_after_s=6.0)


def info(name: str) -> NodeInfo:
    return NodeInfo(name, name, "cpu", 1 << 30, 1.0)


def run(*events) -> ClusterView:
    view = ClusterView()
    for event in events:
        view = reduce(view, event, CFG)
    return view


def test_join_adds_in_order_and_bumps_epoch() -> None:
    view = run(Joined(info("a"), 0), Joined(info("b"), 1))
    assert view.ids == ("a", "b") and view.epoch == 2


def test_rejoin_replaces_info_keeps_order_and_join_time() -> None:
    updated = NodeInfo("a", "a", "cuda", 8 << 30, 10.0)
    view = run(Joined(info("a"), 0), Joined(info("b"), 1), Joined(updated, 2))
    assert view.ids == ("a", "b")
    assert view.get("a").info.device == "cuda" and view.get("a").joined_at == 0


@pytest.mark.parametrize("gone", [Left, Lost])
def test_leaving_or_losing_removes_at_once(gone) -> None:
    view = run(Joined(info("a"), 0), Joined(info("b"), 0), gone("a", 0.1))
    assert view.ids == ("b",) and view.epoch == 3


def test_unknown_leaves_and_beats_change_nothing() -> None:
    view = run(Joined(info("a"), 0))
    assert reduce(view, Left("zz", 1), CFG) is view
    assert reduce(view, Beat("zz", 0.5, "busy", 1), CFG) is view


def test_beats_update_load_without_moving_the_epoch() -> None:
    view = run(Joined(info("a"), 0), Beat("a", 0.75, "busy", 1.0))
    assert view.epoch == 1 and view.get("a").load == 0.75 and view.get("a").status == "busy"


# (time of the tick, expected health of "a" or None when removed, epoch)
TIMELINE = [
    (2.9, "alive", 1),
    (3.0, "alive", 1),  # exactly three missed beats is not yet "more than"
    (3.1, "suspected", 2),
    (5.9, "suspected", 2),
    (6.1, None, 3),
]


def test_silence_makes_a_member_suspected_then_dead() -> None:
    view = run(Joined(info("a"), 0))
    for now, health, epoch in TIMELINE:
        view = reduce(view, Tick(now), CFG)
        member = view.get("a")
        assert (member.health if member else None) == health, now
        assert view.epoch == epoch, now


def test_a_beat_clears_suspicion_and_bumps_the_epoch() -> None:
    view = run(Joined(info("a"), 0), Tick(3.5))
    assert view.get("a").suspected
    view = reduce(view, Beat("a", 0.0, "idle", 3.6), CFG)
    assert not view.get("a").suspected and view.epoch == 3
    assert reduce(view, Tick(4.0), CFG) is view  # nothing changed, same object


def test_dead_member_beats_are_ignored_until_it_joins_again() -> None:
    view = run(Joined(info("a"), 0), Tick(7))
    assert view.ids == ()
    assert reduce(view, Beat("a", 0, "idle", 7.1), CFG).ids == ()
    assert reduce(view, Joined(info("a"), 7.2), CFG).ids == ("a",)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"heartbeat_s": 0}, "positive"), ({"dead_after_s": 2.0}, "must exceed"), ({"suspect_after_beats": 0}, "at least")],
)
def test_config_is_validated(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        MembershipConfig(**kwargs)


def test_nodes_that_share_a_name_are_told_apart_by_their_id() -> None:
    from peerpipe.cluster.membership import unique_names

    assert unique_names({"aaaa1": "vm", "bbbb2": "vm", "cccc3": "laptop"}) == {"aaaa1": "vm-aaaa", "bbbb2": "vm-bbbb", "cccc3": "laptop"}
    assert unique_names({"aaaa1": "vm"}) == {"aaaa1": "vm"}


def test_a_host_that_stood_still_does_not_count_its_own_silence_against_members() -> None:
    # a beat at 4, then the host froze from 4.25 to 13.25: a, whose beats sat unread, stays
    # unsuspected; b, silent since 0 before the freeze too, is suspected but not dead.
    view = run(Joined(info("a"), 0), Joined(info("b"), 0), Beat("a", 0.0, "idle", 4.0), HostAway(9.0), Tick(13.25))
    assert view.ids == ("a", "b") and [m.suspected for m in view.members] == [False, True]
    assert run(Joined(info("a"), 0), Beat("a", 0.0, "idle", 4.0), Tick(13.25)).ids == ()  # (without: dead)

