"""How the host runs its cluster: membership timing, when and how it plans."""

from __future__ import annotations

from dataclasses import dataclass, field

from peerpipe.cluster.membership import MembershipConfig
from peerpipe.plan import STRATEGIES, Budget, Objective, PlanError
from peerpipe.plan.wire import check_wire


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

    def __post_init__(self) -> None:
        # Checked here, not when the first plan is made: a room must not open and then fail.
        check_wire(self.wire)
        if self.strategy not in STRATEGIES:
            raise PlanError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.objective not in {o.value for o in Objective}:
            raise PlanError(f"unknown objective {self.objective!r}; choose one of {', '.join(o.value for o in Objective)}")
        if self.expect_nodes < 1 or self.replicas < 0:
            raise PlanError(f"expect_nodes must be at least 1 and replicas at least 0, not {self.expect_nodes} and {self.replicas}")
