"""The note a host or member leaves so that ``status`` finds its room without a code."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerpipe.cli.room_registry import live_rooms, registered


def test_a_room_is_noted_while_it_runs_and_forgotten_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERPIPE_CACHE", str(tmp_path))
    with registered("5-amber-falcon", "127.0.0.1:4000", "member") as note:
        assert [(e.code, e.host, e.role) for e in live_rooms()] == [("5-amber-falcon", "127.0.0.1:4000", "member")]
        note("6-brave-otter")
        assert [e.code for e in live_rooms()] == ["6-brave-otter"]
        assert (tmp_path / "rooms").stat().st_mode & 0o077 == 0  # the code is the room's secret
    assert live_rooms() == []


def test_a_cache_that_cannot_be_written_costs_one_warning_not_the_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("PEERPIPE_CACHE", str(blocked))
    with registered("5-amber-falcon", "127.0.0.1:4000", "member") as note:
        note("6-brave-otter")
    err = capsys.readouterr().err
    assert err.count("warning: cannot note this room") == 1 and "--room" in err
