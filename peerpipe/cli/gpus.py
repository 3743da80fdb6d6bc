"""``--gpus all|0,1`` on ``host`` and ``join``: one node per GPU, with one command.

This process is the node of the first GPU; every other GPU gets a ``peerpipe join`` child that
dials this room, each benchmarked and planned on its own. All of them listen on one address, so
the planner sees one machine: hidden states between them go through shared memory, never the
socket (transport/shared_memory.py). GPUs named twice (``0,0``) hold two nodes that split the
GPU's free memory. Children stop when this process does (and die with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from peerpipe.errors import PeerpipeError

# Tests run the mechanics on a machine without GPUs: every "GPU" is then this machine's CPU.
_AS_CPU = "PEERPIPE_TEST_GPUS_AS_CPU"
_PR_SET_PDEATHSIG = 1


def parse_gpus(text: str) -> str:
    """``all`` or a comma-separated list of GPU indices (a GPU may be named twice)."""
    if text == "all" or all(p.strip().isdigit() for p in text.split(",")):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not all or GPU indices like 0,1")


def add_gpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus",
        type=parse_gpus,
        metavar="all|0,1",
        help="run one node per GPU of this machine (all, or their indices; 0,0 puts two nodes on GPU 0), each "
        "planned on its own; hidden states between them stay in this machine's memory",
    )


@dataclass(frozen=True)
class GpuNode:
    index: int  # which GPU
    device: str  # what the node passes to torch
    name: str
    memory_gb: float | None  # what it offers the room (its share of a GPU named twice)


def gpu_nodes(text: str, name: str, memory_gb: float | None) -> list[GpuNode]:
    """The nodes ``--gpus`` asks for, checked against the GPUs this machine has."""
    as_cpu = os.environ.get(_AS_CPU) == "1"
    count = int(os.environ.get("PEERPIPE_TEST_GPU_COUNT", "2")) if as_cpu else _cuda_count()
    if count == 0:
        raise PeerpipeError("--gpus needs CUDA GPUs, and PyTorch sees none here (peerpipe doctor says why)")
    indices = list(range(count)) if text == "all" else [int(p) for p in text.split(",")]
    if bad := [i for i in indices if i >= count]:
        raise PeerpipeError(f"--gpus {text}: no GPU {bad[0]} here (PyTorch sees {count}: 0 to {count - 1})")
    base = name or os.uname().nodename
    nodes = []
    free: dict[int, float] = {}  # read once a GPU: the nodes sharing it get equal shares
    for n, i in enumerate(indices):
        sharing = indices.count(i)
        if memory_gb is None and sharing > 1 and i not in free:
            free[i] = _free_gb(i, as_cpu)
        share = memory_gb if memory_gb is not None or sharing == 1 else free[i] / sharing
        suffix = f"-gpu{i}" + (f"-{indices[:n].count(i) + 1}" if sharing > 1 else "")
        nodes.append(GpuNode(i, "cpu" if as_cpu else f"cuda:{i}", base + suffix, share))
    return nodes


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _free_gb(index: int, as_cpu: bool) -> float:
    if as_cpu:
        from peerpipe.cluster.capabilities import memory_info

        return memory_info()[1] * 0.9 / 1e9
    import torch

    free, _ = torch.cuda.mem_get_info(index)
    return free * 0.9 / 1e9  # the other nodes' own CUDA contexts come out of it too


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class GpuChildren:
    """The ``join`` processes of every GPU node but the first; their lines are printed here,
    each prefixed with the node's name."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.procs: list[asyncio.subprocess.Process] = []
        self._pumps: list[asyncio.Task[None]] = []

    async def start(
        self, nodes: Sequence[GpuNode], code: str, peer: tuple[str, int] | None, listen: str, extra: Sequence[str]
    ) -> None:
        for node in nodes:
            args = ["join", code, "--listen", listen, "--name", node.name, "--device", node.device, *extra]
            if peer is not None:
                args += ["--peer", f"{peer[0]}:{peer[1]}"]
            if node.memory_gb is not None:
                args += ["--memory", f"{node.memory_gb:.3f}"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "peerpipe", *args,
                stdout=asyncio.subprocess.PIPE, stderr=None, preexec_fn=_die_with_parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            self.procs.append(proc)
            self._pumps.append(asyncio.create_task(self._pump(node.name, proc)))
            self.say(f"{node.name}: started on {node.device} (pid {proc.pid})")

    async def _pump(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            self.say(f"[{name}] {line.decode(errors='replace').rstrip()}")
        code = await proc.wait()
        if code not in (0, -signal.SIGINT, -signal.SIGTERM):
            self.say(f"{name}: exited with status {code}")

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Each child says goodbye to the room (SIGINT) and is killed if it takes too long."""
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump


def child_arguments(args: argparse.Namespace) -> list[str]:
    """What every GPU child repeats of this command's options."""
    extra = ["--quantize", args.quantize]
    if getattr(args, "model", None) is not None:
        extra += ["--model", str(args.model)]
    if args.threads is not None:
        extra += ["--threads", str(args.threads)]
    if args.quick:
        extra.append("--quick")
    return extra


def wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")
