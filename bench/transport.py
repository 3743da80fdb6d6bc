"""Transport benchmark: encrypted peerpipe connection vs plain TCP, asyncio vs uvloop.

Measures, on loopback in one process (both ends share the event loop):
  * round trip of an 8 KB tensor message (ComputeRequest out, ComputeResult back), median;
  * throughput of 4 MiB tensor messages, one direction, in MiB/s.
The plain baseline uses the same messages and the same length-prefixed framing over
asyncio streams, without the handshake, encryption, chunking or scheduling.

    .venv/bin/python bench/transport.py [--rtt-n 3000] [--tput-n 150]

Prints a table, then one line of JSON with every figure and the encrypted/plain ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from peerpipe.protocol import ComputeRequest, ComputeResult, Message, TensorData, decode, encode
from peerpipe.room import Host, Member, PeerInfo, parse_code
from peerpipe.transport import TransportConfig, run

CODE = parse_code("7-amber-falcon")
LEN = struct.Struct(">I")


def tensor(nbytes: int) -> TensorData:
    return TensorData.from_numpy(np.random.default_rng(0).standard_normal((1, nbytes // 4), dtype=np.float32))


# -- encrypted peerpipe ---------------------------------------------------------------------


async def encrypted(rtt_n: int, tput_n: int) -> dict[str, float]:
    small, big = tensor(8 * 1024), tensor(4 * 1024 * 1024)
    config = TransportConfig(keepalive_s=30.0, idle_timeout_s=60.0)
    state: dict[str, Any] = {"count": 0, "t0": 0.0}
    samples: list[float] = []
    all_in, rtt_done = asyncio.Event(), asyncio.Event()
    total = rtt_n + rtt_n // 10

    async def host_on_message(peer: PeerInfo, msg: Message) -> None:
        # Echo from the receive path, as a pipeline stage forwards hidden states.
        if isinstance(msg, ComputeRequest) and msg.task_id.startswith("rtt"):
            await host.send(peer.node_id, ComputeResult(msg.task_id, msg.input_tensor))
        else:
            state["count"] += 1
            if state["count"] == tput_n:
                all_in.set()

    async def member_on_message(peer: PeerInfo, msg: Message) -> None:
        # Like the baseline's client loop, one task receives a reply and sends the next request.
        now = time.perf_counter()
        samples.append(now - state["t0"])
        if len(samples) == total:
            rtt_done.set()
            return
        state["t0"] = time.perf_counter()
        await member.send(peer.node_id, ComputeRequest(f"rtt{len(samples)}", small))

    async with Host(CODE, name="bench-host", config=config, on_message=host_on_message) as host:
        addr = await host.open(("127.0.0.1", 0), advertise=False)
        async with Member(CODE, name="bench-member", config=config, on_message=member_on_message) as member:
            await member.join(addr)
            state["t0"] = time.perf_counter()
            await member.send(host.node_id, ComputeRequest("rtt0", small))
            await asyncio.wait_for(rtt_done.wait(), 120)
            del samples[: rtt_n // 10]  # warm-up
            t0 = time.perf_counter()
            for i in range(tput_n):
                await member.send(host.node_id, ComputeRequest(f"tput{i}", big))
            await asyncio.wait_for(all_in.wait(), 60)
            tput = tput_n * big.nbytes / (1 << 20) / (time.perf_counter() - t0)
    return {"rtt_us": statistics.median(samples) * 1e6, "tput_mib_s": tput}


# -- plain TCP baseline ---------------------------------------------------------------------


async def _read(reader: asyncio.StreamReader) -> Message:
    (n,) = LEN.unpack(await reader.readexactly(4))
    return decode(await reader.readexactly(n))


def _write(writer: asyncio.StreamWriter, msg: Message) -> None:
    body = encode(msg)
    writer.writelines([LEN.pack(len(body)), body])


async def plain(rtt_n: int, tput_n: int) -> dict[str, float]:
    small, big = tensor(8 * 1024), tensor(4 * 1024 * 1024)
    mode = {"echo": True}
    counted = asyncio.Queue[int]()
    finished = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg = await _read(reader)
                assert isinstance(msg, ComputeRequest)
                if mode["echo"]:
                    _write(writer, ComputeResult(msg.task_id, msg.input_tensor))
                    await writer.drain()
                else:
                    counted.put_nowait(msg.input_tensor.nbytes)
        except asyncio.IncompleteReadError:
            writer.close()
        finished.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=1 << 20)
    async with server:
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2], limit=1 << 20)
        writer.transport.set_write_buffer_limits(high=4 << 20)
        samples = []
        for i in range(rtt_n + rtt_n // 10):
            t0 = time.perf_counter()
            _write(writer, ComputeRequest(f"rtt{i}", small))
            await writer.drain()
            await _read(reader)
            if i >= rtt_n // 10:
                samples.append(time.perf_counter() - t0)
        mode["echo"] = False
        t0 = time.perf_counter()

        async def sink() -> None:
            for _ in range(tput_n):
                await counted.get()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(sink())
            for i in range(tput_n):
                _write(writer, ComputeRequest(f"tput{i}", big))
                await writer.drain()
        tput = tput_n * big.nbytes / (1 << 20) / (time.perf_counter() - t0)
        writer.close()
        await asyncio.wait_for(finished.wait(), 5)
    return {"rtt_us": statistics.median(samples) * 1e6, "tput_mib_s": tput}


def measure(fn: Callable[[int, int], Any], use_uvloop: bool, args: argparse.Namespace) -> dict[str, float]:
    return run(fn(args.rtt_n, args.tput_n), use_uvloop=use_uvloop)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtt-n", type=int, default=3000, help="round trips to time (default 3000)")
    parser.add_argument("--tput-n", type=int, default=150, help="4 MiB messages to send (default 150)")
    args = parser.parse_args()
    try:
        import uvloop  # noqa: F401

        loops = [("asyncio", False), ("uvloop", True)]
    except ImportError:
        loops = [("asyncio", False)]
    results: dict[str, Any] = {}
    print(f"{'loop':8} {'transport':10} {'8KB round trip':>16} {'4MiB tensors':>14}")
    for loop_name, use_uvloop in loops:
        for kind, fn in (("plain", plain), ("encrypted", encrypted)):
            r = measure(fn, use_uvloop, args)
            results[f"{loop_name}_{kind}"] = {k: round(v, 1) for k, v in r.items()}
            print(f"{loop_name:8} {kind:10} {r['rtt_us']:13.1f} us {r['tput_mib_s']:10.0f} MiB/s", flush=True)
        enc, pl = results[f"{loop_name}_encrypted"], results[f"{loop_name}_plain"]
        results[f"{loop_name}_rtt_ratio"] = round(enc["rtt_us"] / pl["rtt_us"], 3)
        results[f"{loop_name}_tput_ratio"] = round(enc["tput_mib_s"] / pl["tput_mib_s"], 3)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
