"""Hot standbys: second copies of stages' layers on other nodes, and promoting them when a node
is lost. Pure functions over ``(node, start, end)`` assignments.

A standby of a stage holds the same layer range (weights and an empty KV cache) on a node other
than the stage's own. With one standby per stage, losing any one node leaves every range held
somewhere: the failover plan swaps each lost stage for its standby, with nothing to load. The KV
cache of the answers in flight is not mirrored; the host rebuilds it by replaying their tokens
(cheaper than sending every token's keys and values to a second node: docs/inference.md).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from peerpipe.plan.cost import stage_memory
from peerpipe.plan.spec import Budget, ModelSpec

Assignment = tuple[str, int, int]  # node id, first layer, end layer (exclusive)


def spare_memory(
    model: ModelSpec, budget: Budget, memory: Mapping[str, int], held: Sequence[Assignment]
) -> dict[str, int]:
    """What each node has left once it holds its assignments (headroom kept)."""
    spare = {node: budget.usable(offered) for node, offered in memory.items()}
    for node, start, end in held:
        if node in spare:
            spare[node] -= stage_memory(model, budget, start, end)
    return spare


def place_standbys(
    model: ModelSpec,
    budget: Budget,
    memory: Mapping[str, int],
    stages: Sequence[Assignment],
    replicas: int,
) -> tuple[Assignment, ...]:
    """Up to ``replicas`` standbys for every stage, each on another node with the memory for it;
    the node with the most to spare first, the largest ranges placed first (they fit fewest)."""
    if replicas <= 0:
        return ()
    spare = spare_memory(model, budget, memory, stages)
    placed: list[Assignment] = []
    order = sorted(stages, key=lambda s: stage_memory(model, budget, s[1], s[2]), reverse=True)
    for owner, start, end in order:
        need = stage_memory(model, budget, start, end)
        for _ in range(replicas):
            taken = {n for n, a, b in placed if (a, b) == (start, end)} | {owner}
            fits = [n for n, left in spare.items() if n not in taken and left >= need]
            if not fits:
                break
            node = max(fits, key=lambda n: (spare[n], n))
            spare[node] -= need
            placed.append((node, start, end))
    return tuple(sorted(placed, key=lambda s: (s[1], s[0])))


def promote(
    stages: Sequence[Assignment], standbys: Sequence[Assignment], lost: Collection[str]
) -> tuple[tuple[Assignment, ...], tuple[Assignment, ...]] | None:
    """The stages once every one held by a ``lost`` node is taken over by a surviving standby of
    its range, and the standbys left; None when some lost range has no standby."""
    pool = [s for s in standbys if s[0] not in lost]
    promoted: list[Assignment] = []
    for node, start, end in stages:
        if node not in lost:
            promoted.append((node, start, end))
            continue
        spare = next((s for s in pool if (s[1], s[2]) == (start, end)), None)
        if spare is None:
            return None
        pool.remove(spare)
        promoted.append(spare)
    return tuple(promoted), tuple(pool)


def uncovered(stages: Sequence[Assignment], standbys: Sequence[Assignment]) -> list[Assignment]:
    """Stages whose loss would leave their range held nowhere."""
    covered = {(a, b) for n, a, b in standbys}
    return [s for s in stages if (s[1], s[2]) not in covered]
