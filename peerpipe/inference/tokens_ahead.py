"""The last stage's tokens, sent before it has computed them.

Where the last stage shares memory with the host and the first stage (the plan gives the last
stage wire "local"), a lone answer's decode step answers at once: its token ids go into two
*pending* allocations of the last stage's shared-memory ring, one for the host to read, the
other (``ComputeResult.ahead``) for the host to pass on, unread, as the first stage's next input.
The reference leaves when the step starts (a CPU stage) or once it is launched (a GPU stage,
whose copy and mark then run on the stream after it). So the host's turn, both hops and the
first stage's preparation run while the last stage computes; between the last stage's end and
the first stage's start there is only the mark the first stage polls for
(``gpu_rows.rows_written``). The host reads its own copy afterwards, streams the text, and drops
the step it sent ahead if the token ended the answer.

``PEERPIPE_TOKENS_AHEAD``: ``auto`` (the default) from GPU stages only (on one H200, 2 stages of
the 8B shape 0.90-0.92x the graphed engine against 0.81-0.83x without); ``0`` never; ``1`` from
CPU stages too, whose readers then poll a core while the last stage computes (on 2 pinned CPU
stages it changed nothing: 0.92-0.94x one node against 0.94-0.95x).
"""

from __future__ import annotations

import os

import torch

from peerpipe.inference.gpu_rows import RingWriter
from peerpipe.inference.stage_sessions import Session
from peerpipe.protocol import ComputeRequest, ComputeResult, TensorData
from peerpipe.transport.shared_memory import Ref, Ring

TOKEN_SHAPE = (1, 1)  # one answer's token: the first stage's input shape for one decode position
TOKEN_BYTES = 8  # int64


def enabled(gpu: bool) -> bool:
    """Whether ``PEERPIPE_TOKENS_AHEAD`` lets a last stage on a GPU (or on CPU) send tokens ahead."""
    value = os.environ.get("PEERPIPE_TOKENS_AHEAD", "auto").strip().lower()
    return value in ("1", "on", "true", "yes") or (value == "auto" and gpu)


def wanted(request: ComputeRequest, session: Session | None) -> bool:
    """Whether this decode step's token may go ahead (the caller checked the rest: the stage
    is enabled, the step is its only request, and the plan says wire "local")."""
    if request.drafts or request.partial or session is None:
        return False
    # A repetition penalty draws from a history the token joins once it is known on the host side.
    return session.params is None or session.params.repetition_penalty == 1.0


class PendingTokens:
    """A CPU stage's token ahead: allocated before the forward, written and marked after it."""

    def __init__(self, ring: Ring, mine: tuple[Ref, memoryview], theirs: tuple[Ref, memoryview]) -> None:
        self.ring = ring
        self._mine, self._theirs = mine, theirs

    @classmethod
    def open(cls, ring: Ring | None) -> PendingTokens | None:
        """Two pending allocations; None without a ring, or when it has no room (the step then
        answers as before)."""
        if ring is None:
            return None
        theirs = ring.alloc(TOKEN_BYTES, pending=True)
        mine = ring.alloc(TOKEN_BYTES, pending=True) if theirs is not None else None
        if theirs is None or mine is None:
            if theirs is not None:
                ring.mark(theirs[0], written=False)
            return None
        return cls(ring, mine, theirs)

    def result(self, request: ComputeRequest) -> ComputeResult:
        mine, theirs = (_tensor(ref) for ref, _ in (self._mine, self._theirs))
        return ComputeResult(request.task_id, mine, request.plan_version, request.start_pos, ahead=theirs)

    def fill(self, ids: TensorData) -> None:
        """The computed token (one id, as the stage would have sent it), into both allocations;
        the first stage's is marked first: it is the one a launch waits for."""
        data = bytes(ids.data)
        if len(data) != TOKEN_BYTES or ids.dtype != "int64":
            raise ValueError(f"a token ahead is one int64 id, not {ids.dtype}{ids.shape}")
        for ref, view in (self._theirs, self._mine):
            view[:] = data
            self.ring.mark(ref)

    def give_up(self) -> None:
        """The forward failed: readers waiting for the token fail at once."""
        for ref, _ in (self._theirs, self._mine):
            self.ring.mark(ref, written=False)


def gpu_tokens(writer: RingWriter, tokens: torch.Tensor) -> tuple[TensorData, TensorData] | None:
    """A GPU stage's token ahead (``tokens``: one id on the device, not yet computed): the host's
    copy and the first stage's, each copied off the device and marked after the step; None when
    the ring is full (the stage then waits for its GPU, as before)."""
    row = tokens.view(TOKEN_SHAPE)
    theirs = writer.send(row)
    mine = writer.send(row) if theirs is not None else None
    return None if theirs is None or mine is None else (mine, theirs)


def _tensor(ref: Ref) -> TensorData:
    return TensorData("int64", TOKEN_SHAPE, ref.pack(), "shm")
