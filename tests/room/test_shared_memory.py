"""The shared-memory ring between processes of one machine (transport/shared_memory.py): space
is reused once released, a full ring says so instead of waiting, and a reference that does not
match what the sender wrote is refused, typed, never read."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerpipe.transport import shared_memory
from peerpipe.transport.shared_memory import REF_BYTES, Ref, Ring, Segments, SharedMemoryError, machine_id


@pytest.fixture
def ring():
    r = Ring(4096)
    yield r
    r.close()


def put(ring: Ring, data: bytes) -> Ref:
    got = ring.alloc(len(data))
    assert got is not None
    ref, view = got
    view[:] = data
    return ref


def test_bytes_cross_and_space_is_reused_once_read(ring: Ring) -> None:
    segments = Segments()
    refs = [put(ring, bytes([i]) * 900) for i in range(4)]  # 4 x (64 + 960) = the whole ring
    assert ring.alloc(1) is None  # full: the caller sends inline rather than wait
    assert ring.in_flight == 4
    # Read out of order: space comes back only once every older allocation is read.
    assert segments.read(refs[2], 900, bytes) == bytes([2]) * 900
    assert ring.alloc(1) is None
    assert segments.read(refs[0], 900, bytes) == bytes([0]) * 900
    assert ring.in_flight == 3  # 1 is still unread, so 2 waits behind it
    again = put(ring, b"x" * 900)  # wraps to the start
    assert again.offset == 0
    assert segments.read(again, 900, bytes) == b"x" * 900
    segments.close()


def test_a_reference_is_read_once(ring: Ring) -> None:
    ref = put(ring, b"abc")
    segments = Segments()
    segments.read(ref, 3, bytes)
    with pytest.raises(SharedMemoryError, match="stale or forged"):
        segments.read(ref, 3, bytes)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: Ref(r.name, r.offset, r.seq + 1), "stale or forged"),
        (lambda r: Ref(r.name, 1 << 40, r.seq), "outside"),
        (lambda r: Ref(r.name, r.offset + 64, r.seq), "stale or forged"),
        (lambda r: Ref(f"peerpipe-{os.getpid()}-00000000", r.offset, r.seq), "cannot open"),
    ],
)
def test_references_that_do_not_match_are_refused(ring: Ring, change, match: str) -> None:
    ref = put(ring, b"hidden" * 10)
    with pytest.raises(SharedMemoryError, match=match):
        Segments().read(change(ref), 60, bytes)
    assert Segments().read(ref, 60, bytes) == b"hidden" * 10  # the real one still reads


def test_a_wrong_length_is_refused(ring: Ring) -> None:
    ref = put(ring, b"abcd")
    with pytest.raises(SharedMemoryError):
        Segments().read(ref, 5, bytes)


def test_only_private_peerpipe_segments_are_opened(tmp_path) -> None:
    with pytest.raises(SharedMemoryError, match="not a peerpipe"):
        Ref.unpack(struct.pack("<24sQQ", b"../../etc/passwd", 0, 1))
    path = shared_memory.SHM_DIR / f"peerpipe-{os.getpid()}-0badf00d"
    path.write_bytes(b"\0" * 4096)
    try:
        path.chmod(0o644)
        with pytest.raises(SharedMemoryError, match="not private"):
            Segments().read(Ref(path.name, 0, 1), 8, bytes)
    finally:
        path.unlink()


def test_an_allocation_nobody_reads_is_given_up(ring: Ring, monkeypatch) -> None:
    ref = put(ring, b"lost")
    later = shared_memory.time.monotonic() + shared_memory.ABANDON_S + 1
    monkeypatch.setattr(shared_memory.time, "monotonic", lambda: later)
    assert ring.in_flight == 0
    with pytest.raises(SharedMemoryError):  # a late reader never sees reused bytes
        Segments().read(ref, 4, bytes)


def test_segments_of_dead_processes_are_removed() -> None:
    dead = shared_memory.SHM_DIR / "peerpipe-999999999-00000000"
    dead.write_bytes(b"")
    r = Ring(4096)
    try:
        assert not dead.exists()
        assert r.path.exists() and oct(r.path.stat().st_mode & 0o777) == "0o600"
    finally:
        r.close()
    assert not r.path.exists()


def test_this_machine_has_an_id() -> None:
    assert len(machine_id()) == 16 and machine_id() == machine_id()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=2 * REF_BYTES))
def test_fuzzed_references_fail_typed(data: bytes) -> None:
    try:
        ref = Ref.unpack(data)
    except SharedMemoryError:
        return
    try:
        Segments().read(ref, 16, bytes)
    except SharedMemoryError:
        pass


def test_a_lean_steps_row_bytes_come_out_of_the_ring_once(ring: Ring) -> None:
    from peerpipe.inference.wire import row_bytes
    from peerpipe.protocol import TensorData

    row = bytes(range(16))
    ref = put(ring, row)
    shared = TensorData("float32", (1, 1, 4), ref.pack(), "shm")
    assert row_bytes(shared) == row
    assert ring.in_flight == 0  # read: the sender may reuse it
    with pytest.raises(SharedMemoryError, match="stale or forged"):
        row_bytes(shared)
    inline = TensorData("float32", (1, 1, 4), row)
    assert bytes(row_bytes(inline)) == row


def test_a_row_sent_inline_when_the_ring_is_full_owns_its_bytes() -> None:
    import torch

    from peerpipe.inference.wire import _to_ring

    small = Ring(64 + 64)  # one 64-byte row fills it
    try:
        buffer = torch.arange(32, dtype=torch.float32).view(2, 1, 16)  # a reused buffer's two rows
        first, second = _to_ring(buffer[0:1], small), _to_ring(buffer[1:2], small)
        assert (first.encoding, second.encoding) == ("shm", "raw")
        buffer.zero_()  # the next step overwrites the buffer
        assert second.to_numpy().reshape(-1).tolist() == [float(v) for v in range(16, 32)]
    finally:
        small.close()


def _mark_written(ring: Ring, ref: Ref, data: bytes) -> None:
    """What a GPU stage's copies do after its step (inference/gpu_rows.py): the bytes, then the state."""
    start = ref.offset + shared_memory.HEADER
    ring.mm[start : start + len(data)] = data
    ring.mm[ref.offset + shared_memory.STATE_AT] = shared_memory.WRITTEN


def test_a_pending_allocation_is_read_once_its_copy_has_marked_it(ring: Ring) -> None:
    import threading

    got = ring.alloc(8, pending=True)
    assert got is not None
    ref = got[0]
    segments = Segments()
    assert not segments.written(ref)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(segments.read(ref, 8, bytes)))
    reader.start()  # it waits for the mark, spinning
    _mark_written(ring, ref, b"12345678")
    reader.join(timeout=30)
    assert read == [b"12345678"]
    assert ring.in_flight == 0


def test_a_pending_allocation_never_written_fails_typed(ring: Ring, monkeypatch) -> None:
    monkeypatch.setattr(shared_memory, "PENDING_S", 0.01)
    got = ring.alloc(8, pending=True)
    assert got is not None
    with pytest.raises(SharedMemoryError, match="not written within"):
        Segments().read(got[0], 8, bytes)


def test_a_stage_waits_for_pending_rows_without_holding_its_loop(ring: Ring) -> None:
    import asyncio

    from peerpipe.inference.gpu_rows import rows_written
    from peerpipe.inference.wire import row_bytes, shared_written
    from peerpipe.protocol import TensorData

    got = ring.alloc(16, pending=True)
    assert got is not None
    pending = TensorData("float32", (1, 1, 4), got[0].pack(), "shm")
    inline = TensorData("float32", (1, 1, 4), bytes(16))
    assert not shared_written(pending) and shared_written(inline)

    async def main() -> int:
        turns = 0

        async def other_work() -> None:  # the loop keeps serving while the row is pending
            nonlocal turns
            while not shared_written(pending):
                turns += 1
                if turns == 50:
                    _mark_written(ring, got[0], bytes(range(16)))
                await asyncio.sleep(0)

        await asyncio.gather(rows_written([inline, pending]), other_work())
        return turns

    assert asyncio.run(main()) == 50
    assert row_bytes(pending) == bytes(range(16))


def test_rows_never_written_fail_typed_and_a_dropped_one_is_left_to_its_sender(ring: Ring, monkeypatch) -> None:
    import asyncio

    from peerpipe.inference import gpu_rows
    from peerpipe.inference.wire import release_shared
    from peerpipe.protocol import TensorData

    monkeypatch.setattr(gpu_rows, "PENDING_S", 0.01)
    got = ring.alloc(16, pending=True)
    assert got is not None
    pending = TensorData("float32", (1, 1, 4), got[0].pack(), "shm")
    with pytest.raises(SharedMemoryError, match="not written within"):
        asyncio.run(gpu_rows.rows_written([pending]))
    release_shared(pending)  # returns at once: the copy may still land
    assert ring.in_flight == 1


def test_a_rings_name_fits_its_reference_for_any_pid() -> None:
    name = shared_memory.segment_name(4194304)  # Linux's largest pid_max
    ref = Ref(name, 64, 7)
    assert Ref.unpack(ref.pack()) == ref


def test_a_pending_allocation_whose_step_failed_fails_its_reader_at_once(ring: Ring) -> None:
    got = ring.alloc(8, pending=True)
    assert got is not None
    ring.mark(got[0], written=False)
    with pytest.raises(SharedMemoryError, match="its step failed"):
        Segments().read(got[0], 8, bytes)
    assert ring.in_flight == 0  # its space is free again at once
    ring.mark(got[0])  # a mark for an allocation since given up changes nothing
    later = ring.alloc(8, pending=True)  # its space, pending again for another step
    assert later is not None and later[0].offset == got[0].offset
    assert Segments().written(got[0])  # (not the old reference's to wait for: reading it fails)
    with pytest.raises(SharedMemoryError, match="stale or forged"):
        Segments().read(got[0], 8, bytes)


def test_a_token_ahead_is_two_pending_copies_filled_after_the_forward(ring: Ring) -> None:
    from peerpipe.inference.tokens_ahead import PendingTokens
    from peerpipe.inference.wire import ids_to_wire, row_bytes, shared_written
    from peerpipe.protocol import ComputeRequest

    tokens = PendingTokens.open(ring)
    assert tokens is not None
    request = ComputeRequest("t", ids_to_wire([3], (1, 1)), "t", 2, 9)
    result = tokens.result(request)
    assert (result.task_id, result.plan_version, result.start_pos) == ("t", 2, 9) and result.ahead is not None
    mine, theirs = result.output_tensor, result.ahead
    assert (mine.dtype, mine.shape, mine.encoding) == (theirs.dtype, theirs.shape, theirs.encoding) == ("int64", (1, 1), "shm")
    assert not shared_written(mine) and not shared_written(theirs)
    with pytest.raises(ValueError, match="one int64 id"):
        tokens.fill(ids_to_wire([1, 2]))
    tokens.fill(ids_to_wire([42]))
    assert row_bytes(theirs) == row_bytes(mine) == (42).to_bytes(8, "little")
    assert ring.in_flight == 0

    failed = PendingTokens.open(ring)
    assert failed is not None
    failed.give_up()
    with pytest.raises(SharedMemoryError, match="its step failed"):
        row_bytes(failed.result(request).output_tensor)
    while ring.alloc(8) is not None:  # a full ring: the step answers as before
        pass
    assert PendingTokens.open(ring) is None


def test_the_hosts_copy_of_a_token_ahead_is_read_once_written_or_fails_typed(ring: Ring, monkeypatch) -> None:
    import asyncio

    from peerpipe.inference import passing
    from peerpipe.inference.errors import TaskFailedError
    from peerpipe.inference.tokens_ahead import PendingTokens
    from peerpipe.inference.wire import ids_to_wire
    from peerpipe.protocol import ComputeRequest

    monkeypatch.setattr(passing, "AHEAD_ERROR_S", 0.01)
    request = ComputeRequest("t", ids_to_wire([3], (1, 1)), "t", 2, 9)

    def opened() -> PendingTokens:
        tokens = PendingTokens.open(ring)
        assert tokens is not None
        return tokens

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ahead = passing.Ahead(send=None)  # type: ignore[arg-type]  # (it only reads here)
        tokens = opened()
        loop.call_later(0.01, tokens.fill, ids_to_wire([7]))  # the stage's forward ends meanwhile
        assert await ahead.read(ahead.pending(tokens.result(request))) == [7]
        # The step failed: the stage's error, which comes soon after, is the answer's.
        tokens = opened()
        tokens.give_up()
        pending = ahead.pending(tokens.result(request))
        loop.call_later(0.001, pending.failed.set_exception, TaskFailedError("m1 layers [3, 4): RuntimeError: boom"))
        with pytest.raises(TaskFailedError, match="boom"):
            await ahead.read(pending)
        # No error came: typed all the same.
        tokens = opened()
        tokens.give_up()
        with pytest.raises(SharedMemoryError, match="its step failed"):
            await ahead.read(ahead.pending(tokens.result(request)))
        # A stage lost while the token is pending ends the wait (the pipeline fails every wait).
        pending = ahead.pending(opened().result(request))
        loop.call_later(0.001, ahead.fail, TaskFailedError("stage m1 left the room"))
        with pytest.raises(TaskFailedError, match="left the room"):
            await ahead.read(pending)
        assert not ahead._reading  # every read forgot its entry

    asyncio.run(main())
