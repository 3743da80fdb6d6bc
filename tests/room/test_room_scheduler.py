from __future__ import annotations

from peerpipe.protocol import Bye, Heartbeat, Message, Ping, TensorChunk
from peerpipe.transport.scheduler import SendScheduler


def chunk(tid: str, i: int, n: int = 3) -> TensorChunk:
    return TensorChunk(tid, i, n, n, b"x")


def drain(s: SendScheduler[str]) -> list[tuple[Message, str | None]]:
    out: list[tuple[Message, str | None]] = []
    while (item := s.pop()) is not None:
        out.append(item)
    return out


def test_control_jumps_ahead_of_bulk_and_transfers_take_turns() -> None:
    s: SendScheduler[str] = SendScheduler()
    s.add(
        [chunk("a", 0), chunk("a", 1), chunk("a", 2), Ping(1)], token="A"
    )  # a transfer ends with its message
    s.add([chunk("b", 0), chunk("b", 1), chunk("b", 2), Ping(2)], token="B")
    first = s.pop()
    s.add([Heartbeat(0.1, "busy")], token="H")
    assert len(s) == 8
    rest = drain(s)
    frames = [first[0]] + [f for f, _ in rest]  # type: ignore[index]
    assert frames[1] == Heartbeat(0.1, "busy")
    ids = [(f.tensor_id, f.chunk_index) for f in frames if isinstance(f, TensorChunk)]
    assert ids == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    tokens = [t for _, t in rest if t is not None]
    assert tokens == ["H", "A", "B"]
    assert len(s) == 0


def test_same_stream_keeps_order_and_clear_returns_tokens() -> None:
    s: SendScheduler[str] = SendScheduler()
    s.add([chunk("a", 0, 2), chunk("a", 1, 2), Ping(1)], token="A", stream="session-1")
    s.add([Ping(2)], token="B", stream="session-1")  # must not overtake A
    s.add([Bye("x")], token="C")
    order = [f for f, _ in drain(s)]
    assert order == [Bye("x"), chunk("a", 0, 2), chunk("a", 1, 2), Ping(1), Ping(2)]
    s.add([chunk("z", 0)], token="Z")
    s.add([Ping(3)], token="P")
    assert sorted(s.clear()) == ["P", "Z"] and s.pop() is None
