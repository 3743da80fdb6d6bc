"""From room facts to planner inputs, the device detection, and the load meter."""

from __future__ import annotations

import pytest

from peerpipe.cluster.capabilities import detect, memory_info
from peerpipe.cluster.local import LoadMeter
from peerpipe.cluster.planning import RoomFacts, lanes, network_from, node_spec, plan_room
from peerpipe.plan import ModelSpec
from peerpipe.protocol import LayerTiming, LinkStat, MemberState, NodeInfo

SPEC = ModelSpec("m", 8, 100 << 20, 200 << 20, 200 << 20, 1024, 4096, 200 << 20)


def info(node_id: str, mem_gb: float = 10, tflops: float = 10.0, gbps: float = 500.0) -> NodeInfo:
    return NodeInfo(node_id, node_id, "cuda", int(mem_gb * (1 << 30)), tflops, memory_bandwidth_gbps=gbps)


def test_measured_timing_is_used_only_for_the_same_shape() -> None:
    timing = LayerTiming("shape-a", "bfloat16", 2.0, 20.0, 128, 50 << 20, 0.5)
    measured = node_spec(SPEC, info("n"), timing, "shape-a", half=True)
    assert measured.decode_layer_ms == 2.0 and measured.stage_ms == 0.5
    # The head is scaled by bytes from the measured layer: 200 MiB / 50 MiB x 2 ms.
    assert measured.head_ms == pytest.approx(8.0)
    estimated = node_spec(SPEC, info("n"), timing, "shape-b", half=True)
    assert estimated.decode_layer_ms != 2.0 and estimated.decode_layer_ms > 0


def test_estimate_without_bandwidth_assumes_it_from_tflops() -> None:
    slow = node_spec(SPEC, info("n", tflops=1.0, gbps=0.0), None, "", half=False)
    fast = node_spec(SPEC, info("n", tflops=10.0, gbps=0.0), None, "", half=False)
    assert slow.decode_layer_ms > fast.decode_layer_ms


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        (("", "", ""), 3),  # nodes without a GPU id (CPUs) each compute on their own
        (("A", "A", "A"), 1),  # three processes of one GPU take turns on it
        (("A", "B", "A"), 2),
        (("A", "B", "C"), 3),
        (("A", "", "A"), 2),
        (("A",), 1),
    ],
)
def test_stages_compute_at_once_one_per_gpu(gpus: tuple[str, ...], expected: int) -> None:
    infos = [NodeInfo(f"n{i}", f"n{i}", "cuda", 1 << 30, 10.0, gpu=g) for i, g in enumerate(gpus)]
    assert lanes([i.node_id for i in infos], infos) == expected
    assert lanes(["stranger", "n0"], infos) == 2  # a node the room does not know counts as its own


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        # (device, machine, cores mask): CPU nodes of one machine take turns where their cores overlap
        ((("cpu", "m", "3"), ("cpu", "m", "3"), ("cpu", "m", "3")), 1),  # unpinned processes of one box
        ((("cpu", "m", "1"), ("cpu", "m", "2")), 2),  # each pinned to a core of its own
        ((("cpu", "m", "1"), ("cpu", "m", "2"), ("cpu", "m", "3")), 1),  # the third spans both: all share
        ((("cpu", "m", "1"), ("cpu", "m", "2"), ("cpu", "m", "4"), ("cpu", "m", "c")), 3),  # 4 and c share core 2
        ((("cpu", "m", "1"), ("cpu", "m", "")), 1),  # cores unknown: shares with every node there
        ((("cpu", "m", "1"), ("cpu", "m", "zz")), 1),  # so does a mask that does not parse
        ((("cpu", "a", "3"), ("cpu", "b", "3")), 2),  # two machines
        ((("cpu", "", "3"), ("cpu", "", "3")), 2),  # no machine id: nothing known to be shared
        ((("cuda", "m", "3"), ("cpu", "m", "3"), ("cpu", "m", "3")), 2),  # a GPU node computes on its GPU
    ],
)
def test_cpu_nodes_sharing_cores_take_turns(nodes: tuple[tuple[str, str, str], ...], expected: int) -> None:
    infos = [
        NodeInfo(f"n{i}", f"n{i}", device, 1 << 30, 1.0, machine=machine, cpus=mask, gpu="G" if device == "cuda" else "")
        for i, (device, machine, mask) in enumerate(nodes)
    ]
    assert lanes([i.node_id for i in infos], infos) == expected
    assert lanes([i.node_id for i in reversed(infos)], infos) == expected  # whatever the order


def test_links_keep_the_slower_direction_and_skip_empty_ones() -> None:
    net = network_from(
        [
            LinkStat("a", "b", 1.0, 100.0),
            LinkStat("b", "a", 3.0, 50.0),
            LinkStat("a", "c", 1.0, 0.0),
        ]
    )
    link = net.link("b", "a")
    assert link.rtt_ms == 3.0 and link.bytes_per_s == 50 * (1 << 20)
    assert net.link("a", "c") is net.default


def test_room_plan_skips_suspected_members_and_starts_at_the_entry() -> None:
    members = [
        MemberState(info("host", mem_gb=0.5)),
        MemberState(info("good")),
        MemberState(info("sick"), health="suspected"),
    ]
    plan = plan_room(SPEC, "", RoomFacts(members), entry="host", half=True)
    assert "sick" not in {s.node_id for s in plan.stages} and plan.entry == "host"


def test_cpu_capabilities_are_plausible() -> None:
    caps = detect("cpu")
    total, free = memory_info()
    assert caps.kind == "cpu" and caps.torch_device == "cpu" and caps.name
    assert caps.cpu_cores >= 1 and 0 < free <= total and caps.ram_total_bytes == total


def test_load_meter_counts_busy_time_in_its_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("peerpipe.cluster.local.time.monotonic", lambda: now[0])
    meter = LoadMeter(window_s=4.0)
    assert meter.load() == 0.0
    meter.start()
    now[0] += 1.0
    assert meter.busy and meter.load() == pytest.approx(0.25)
    meter.stop()
    now[0] += 2.0
    assert not meter.busy and meter.load() == pytest.approx(0.25)
    now[0] += 3.0  # the busy second has left the window
    assert meter.load() == 0.0
