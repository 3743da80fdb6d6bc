"""A preallocated KV cache shared by many sessions, one *slot* per session.

Keys and values of a stage live in one tensor ``[layers, slots, max_seq, 2, kv_heads, head_dim]``:
a position's keys sit next to its values, so one copy stores both (the model computes them next
to each other too).
Attention masks by position (a query at position p sees keys at positions <= p), so entries past
a session's length are never read: rolling a session back is bookkeeping only, and the next
write at that position overwrites the stale entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peerpipe.engine.errors import CacheError


@dataclass(frozen=True)
class Batch:
    """Where one forward reads and writes: one row per session.

    ``positions`` is ``[B, S]``: the absolute position of every new token. ``kv_len`` bounds the
    keys attended to (at least ``positions.max() + 1``; keys past a row's position are masked). ``slot_start`` is set when the slots are
    the contiguous range ``slot_start .. slot_start + B``, which lets attention read a view
    instead of gathering. ``single`` is ``(slot, start)`` when the batch is one session whose
    positions are known on the host: writes then become one slice copy instead of a scatter.
    A batch replayed from a CUDA graph must leave it None, since its positions change.
    """

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, S] long
    kv_len: int
    slot_start: int | None
    single: tuple[int, int] | None = None
    slot_ids: tuple[int, ...] = ()  # the slots on the host, so callers need not sync to read them

    def write(self, store: torch.Tensor, new: torch.Tensor) -> None:
        """Put keys and values ``new`` ``[B, S, 2, KV, D]`` into one layer's ``store``."""
        if self.single is not None:
            slot, start = self.single
            store[slot].narrow(0, start, new.shape[1]).copy_(new[0])
            return
        store.index_put_((self.slots[:, None], self.positions), new)

    def views(self, store: torch.Tensor) -> KeysValues | None:
        """Keys and values of contiguous slots as views of one layer's ``store`` ``[B, KV, L, D]``
        each; None when the slots are scattered."""
        if self.slot_start is None:
            return None
        return _split(store.narrow(0, self.slot_start, self.slots.shape[0]).narrow(1, 0, self.kv_len))

    def gather(self, store: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of scattered slots, copied out: ``[B, KV, L, D]`` each."""
        return _split(store.narrow(1, 0, self.kv_len).index_select(0, self.slots))


KeysValues = tuple[torch.Tensor, torch.Tensor]


def _split(kv: torch.Tensor) -> KeysValues:
    """``[B, L, 2, KV, D]`` -> keys and values ``[B, KV, L, D]`` (views)."""
    return kv.select(2, 0).transpose(1, 2), kv.select(2, 1).transpose(1, 2)


DECODE_BUCKET = 64
_MAX_CACHED_READS = 256


class KVCache:
    def __init__(
        self,
        n_layers: int,
        max_slots: int,
        max_seq: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if max_slots <= 0 or max_seq <= 0:
            raise CacheError("a KV cache needs at least one slot and one position")
        # One spare position past max_seq: a scratch row that warm-up runs (CUDA-graph capture)
        # may write without touching any session's keys.
        shape = (n_layers, max_slots, max_seq + 1, 2, n_kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        # Per-layer views, so the hot loop does not re-select a layer on every access.
        self.layers = list(self.kv.unbind(0))
        # Read views per (first slot, rows, kv_len), reused while decode stays in a KV bucket.
        self._reads: dict[tuple[int, int, int], list[KeysValues]] = {}
        self.max_slots = max_slots
        self.max_seq = max_seq
        self.scratch_position = max_seq
        self.lengths = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))
        self._in_use: set[int] = set()

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        """Reserve a slot for a new session; its length starts at 0."""
        if not self._free:
            raise CacheError(f"all {self.max_slots} KV-cache slots are in use; wait for a session to end")
        slot = self._free.pop()
        self._in_use.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self._check(slot)
        self._in_use.discard(slot)
        self.lengths[slot] = 0
        self._free.append(slot)

    def rollback(self, slot: int, length: int) -> None:
        """Forget every position >= ``length`` of a session (e.g. rejected draft tokens)."""
        self._check(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise CacheError(
                f"cannot roll slot {slot} back to {length}: it holds {self.lengths[slot]} positions"
            )
        self.lengths[slot] = length

    def advance(self, slots: Sequence[int], n_new: int) -> tuple[list[int], int]:
        """Check a forward that appends ``n_new`` tokens to each session and advance their
        lengths, on the host alone: each session's first new position, and the keys attended to."""
        if not slots or n_new <= 0:
            raise CacheError("a batch needs at least one session and one new token")
        starts = []
        for slot in slots:
            self._check(slot)
            end = self.lengths[slot] + n_new
            if end > self.max_seq:
                raise CacheError(
                    f"session in slot {slot} would reach {end} positions; the cache holds {self.max_seq}"
                )
            starts.append(self.lengths[slot])
        if len(set(slots)) != len(slots):
            raise CacheError("a session appears twice in one batch")
        for slot in slots:
            self.lengths[slot] += n_new
        kv_len = max(starts) + n_new
        if n_new == 1:
            # Decode attends to a whole bucket (the mask hides the tail), so the read views of
            # one bucket serve many steps.
            kv_len = min(self.max_seq, -(-kv_len // DECODE_BUCKET) * DECODE_BUCKET)
        return starts, kv_len

    def batch(self, slots: Sequence[int], n_new: int) -> Batch:
        """Plan a forward that appends ``n_new`` tokens to each session, and advance their lengths."""
        starts, kv_len = self.advance(slots, n_new)
        if len(slots) == 1 and n_new == 1:
            # A decode step of one session: filled on the device, where a copy from pageable host
            # memory would wait for the work queued before it (LocalEngine launches steps ahead).
            positions = torch.full((1, 1), starts[0], dtype=torch.long, device=self.device)
            slot_ids = torch.full((1,), slots[0], dtype=torch.long, device=self.device)
        else:
            start = torch.tensor(starts, dtype=torch.long)
            positions = (start[:, None] + torch.arange(n_new)[None, :]).to(self.device)
            slot_ids = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        first = slots[0]
        contiguous = list(slots) == list(range(first, first + len(slots)))
        return Batch(
            slots=slot_ids,
            positions=positions,
            kv_len=kv_len,
            slot_start=first if contiguous else None,
            single=(first, starts[0]) if len(slots) == 1 else None,
            slot_ids=tuple(slots),
        )

    def reads(self, batch: Batch) -> list[KeysValues | None]:
        """For every layer, views of the batch's keys and values (first ``kv_len`` positions).

        Views alias the cache, so they show what a layer writes just before reading. Rows that
        are not contiguous slots must be gathered instead, after the write: None then."""
        if batch.slot_start is None:
            return [None] * len(self.layers)
        key = (batch.slot_start, batch.slots.shape[0], batch.kv_len)
        views = self._reads.get(key)
        if views is None:
            views = [batch.views(store) for store in self.layers]
            if batch.positions.shape[1] == 1 and len(self._reads) < _MAX_CACHED_READS:
                self._reads[key] = views  # decode comes back to the same bucket; prefill rarely does
        return views

    def _check(self, slot: int) -> None:
        if slot not in self._in_use:
            raise CacheError(f"slot {slot} is not an allocated session")
