"""Where one token's time goes, hop by hop, from the traces a room writes (peerpipe/inference/trace.py).

For every decode step of one answer: host -> first stage, then per stage the wait in its queue,
its forward (with the copy off the device; on a GPU split into the work's way to the device, the
wait for the GPU, the GPU's run by CUDA events and what follows; a step whose input a GPU stage on
this machine sent before its GPU had run it waits for that GPU within "to the device", and a step
sent on that way ends at its launch), the hand-off to the socket and the wire to the next
node (read, decrypt and decode included), the last stage back to the host, and the host's turn
(the token pushed, streamed to the client, the next step made). Medians in microseconds.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

Step = dict[str, list[int]]


def read(folder: Path) -> dict[tuple[str, int], Step]:
    """Events of every step, by (task, position): each event's times in order."""
    steps: dict[tuple[str, int], Step] = defaultdict(lambda: defaultdict(list))
    for path in folder.glob("trace-*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                steps[(parts[2], int(parts[3]))][parts[1]].append(int(parts[0]))
    for events in steps.values():
        for times in events.values():
            times.sort()
    return steps


def segments(steps: dict[tuple[str, int], Step], stages: int, tasks: set[str]) -> dict[str, float]:
    """Median microseconds of each part of the decode steps of ``tasks`` (answers that ran alone)."""
    parts: dict[str, list[float]] = defaultdict(list)
    for (task, pos), ev in steps.items():
        if task not in tasks:
            continue
        if not all(len(ev.get(e, ())) == n for e, n in (("send", 1), ("token", 1), ("in", stages), ("start", stages), ("end", stages))):
            continue
        nxt = steps.get((task, pos + 1), {}).get("send")
        if nxt is None:
            continue  # the answer's last step, or a prompt
        us = lambda a, b: (b - a) / 1e3  # noqa: E731
        # Where the sender marked the hand-off to its socket ("sent", "out"), the hop splits into
        # the sender's part and the rest (the wire, and the receiver's read, decryption, decoding).
        sent = ev.get("sent", [])
        handed = sent[0] if len(sent) == 1 else ev["send"][0]
        if len(sent) == 1:
            parts["host sends"].append(us(ev["send"][0], handed))
        parts["host -> stage 1"].append(us(handed, ev["in"][0]))
        out = ev.get("out", [])
        split = len(out) >= stages - 1
        for i in range(stages):
            parts[f"stage {i + 1} queue"].append(us(ev["in"][i], ev["start"][i]))
            parts[f"stage {i + 1} forward"].append(us(ev["start"][i], ev["end"][i]))
            if len(ev.get("launched", ())) == stages:  # a GPU stage's forward, split
                parts[f"  {i + 1}: to the device"].append(us(ev["start"][i], ev["launched"][i]))
            inside = [ev.get(e, ()) for e in ("launched", "run", "ready")]
            if all(len(times) == stages for times in inside):  # (steps sent early have no "ready")
                launched, run, ready = (times[i] for times in inside)
                parts[f"  {i + 1}: waits for GPU"].append(us(launched, run))
                parts[f"  {i + 1}: GPU runs"].append(us(run, ready))
                parts[f"  {i + 1}: after"].append(us(ready, ev["end"][i]))
            if i + 1 < stages:
                handed = out[i] if split else ev["end"][i]
                if split:
                    parts[f"stage {i + 1} sends"].append(us(ev["end"][i], handed))
                parts[f"stage {i + 1} -> {i + 2}"].append(us(handed, ev["in"][i + 1]))
        parts[f"stage {stages} -> host"].append(us(ev["end"][-1], ev["token"][0]))
        parts["host turn"].append(us(ev["token"][0], nxt[0]))
        parts["token"].append(us(ev["send"][0], nxt[0]))
    return {name: statistics.median(values) for name, values in parts.items()}


def table(rows: dict[int, dict[str, float]]) -> list[str]:
    """One line per part, a column per room size."""
    widest = max(rows.values(), key=len)  # its parts in a step's order; the others' "-> host" after
    order = list(dict.fromkeys([*(n for n in widest if "host" not in n[6:] and n not in ("token", "host turn")),
                                *(n for r in rows.values() for n in r if n.endswith("-> host")), "host turn", "token"]))
    head = f"{'us per token':>22}" + "".join(f"{f'{s} stage(s)':>14}" for s in rows)
    lines = [head]
    for name in order:
        lines.append(f"{name:>22}" + "".join(f"{r[name]:>14.0f}" if name in r else f"{'':>14}" for r in rows.values()))
    return lines


def room_parts(folder: Path, stages: int, alone: set[str], together: set[str]) -> dict[str, dict[str, float]]:
    """A room's figures from its traces: ``hops_us`` for the answers run alone, and
    ``hops_16_us`` for the 16 run at once (when they ran)."""
    steps = read(folder)
    parts = {"hops_us": segments(steps, stages, alone)}
    if together:
        parts["hops_16_us"] = segments(steps, stages, together)
    return parts


def report(shape: str, rooms: list[dict]) -> list[str]:
    """The tables of one shape's rooms (bench/pipeline.py's entries), when they were traced."""
    lines: list[str] = []
    traced = {e["stages"]: e["hops_us"] for e in rooms if e.get("hops_us")}
    if traced:
        lines += [f"{shape}: where one token's time goes (medians of one answer's decode steps)", *table(traced)]
    for e in rooms:
        if e.get("hops_16_us"):
            lines += [f"{shape}, {e['stages']} stages, 16 answers at once (medians over their steps)"]
            lines += table({e["stages"]: e["hops_16_us"]})
    return lines
