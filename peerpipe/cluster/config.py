"""How the host runs its cluster: membership timing, when and how it plans."""

from __future__ import annotations

from dataclasses import dataclass, field

from peerpipe.cluster.membership import MembershipConfig
from peerpipe.plan import Budget


@dataclass(frozen=True)
class ClusterConfig:
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    replan_debounce_s: float = 1.0
    benchmark_timeout_s: float = 120.0
    prefetch_timeout_s: float = 3600.0  # how long the current plan serves while nodes fetch the next one's layers
    measure_links: bool = True
    auto_plan: bool = True
    expect_nodes: int = 1  # plan once this many nodes (the host included) are alive
    budget: Budget = field(default_factory=Budget)
    strategy: str = "optimal"
    objective: str = "latency"
    wire: str = "auto"  # hidden states between nodes: auto (by each link's bandwidth), native, bf16, fp16, int8
    replicas: int = 0  # standby copies of each stage, where memory allows (failover without loading)
