from __future__ import annotations

from peerpipe.room import FailureLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_mistake_is_free_then_delay_doubles_up_to_cap() -> None:
    clock = FakeClock()
    lim = FailureLimiter(base_delay_s=0.5, max_delay_s=4.0, clock=clock)
    assert lim.delay_for("10.0.0.9") == 0.0
    lim.failed("10.0.0.9")
    assert lim.delay_for("10.0.0.9") == 0.0  # a typo is answered at once
    lim.failed("10.0.0.9")
    assert lim.delay_for("10.0.0.9") == 0.5
    delays = []
    for _ in range(6):
        lim.failed("10.0.0.9")
        delays.append(lim.delay_for("10.0.0.9"))
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert lim.delay_for("10.0.0.8") == 0.0  # per address


def test_success_and_quiet_time_forgive() -> None:
    clock = FakeClock()
    lim = FailureLimiter(base_delay_s=1.0, free_failures=0, forget_after_s=60, clock=clock)
    lim.failed("a")
    assert lim.delay_for("a") == 1.0
    lim.succeeded("a")
    assert lim.delay_for("a") == 0.0
    lim.failed("a")
    lim.failed("a")
    clock.now += 59
    assert lim.failures("a") == 2
    clock.now += 2
    assert lim.failures("a") == 0 and lim.delay_for("a") == 0.0


def test_memory_is_bounded() -> None:
    clock = FakeClock()
    lim = FailureLimiter(max_tracked=10, clock=clock)
    for i in range(100):
        clock.now += 1
        lim.failed(f"10.0.0.{i}")
    assert len(lim._records) <= 10
    assert lim.failures("10.0.0.99") == 1


def test_guesses_from_many_addresses_meet_a_room_wide_budget() -> None:
    now = [0.0]
    limiter = FailureLimiter(room_free_failures=4, clock=lambda: now[0])
    for i in range(4):
        limiter.failed(f"10.0.0.{i}")  # each address makes only its free mistake
    assert limiter.delay_for("10.0.0.99") == 0.0
    limiter.failed("10.0.0.5")
    assert limiter.delay_for("10.0.0.99") > 0  # a fresh address now waits too
    limiter.succeeded("10.0.0.5")
    assert limiter.delay_for("10.0.0.99") > 0  # one member's success forgives nobody else
    now[0] += limiter.forget_after_s + 1
    assert limiter.delay_for("10.0.0.99") == 0.0  # a quiet room forgets
