"""The network in the simulator: collectives as ops on the `net` stream, and what-ifs for one slow rank or link.

Ranks are symmetric: every rank of a data-parallel plan runs the same schedule on the same shapes, so one rank
simulated stands for all of them. A collective (planner.schedule's `reduce_grads` and `gather_weights`) is one
op on the `net` stream, FIFO like every other stream, that starts when its inputs are ready on the simulated
rank and lasts `planner.cluster.collective_seconds` over the plan's cluster: the one cost rule the ILP and the
runtime's byte counts also use (ring, hierarchical over nodes). No second formula lives here.

A straggler: one rank whose GPU compute (the `compute` stream: forwards, backwards, recomputes, a GPU optimizer
step) takes k times as long; its copies, NVMe and CPU optimizer run at the usual speed. A collective cannot
finish before every rank has contributed, so it starts when the LAST rank is ready. The recurrence of one rank
(start = max(stream predecessor, dependencies), finish = start + duration) is monotone in the durations, so a
rank whose every duration is no longer than the straggler's reaches every op no later than the straggler does:
by induction over the ops in list order, including the collectives, which start at the same (the straggler's)
time on every rank and end at the same time. So the ranks' common timeline is the straggler's own: the step is
the schedule simulated with compute stretched by k and collectives priced as usual. That is not k times the
step: copies and collectives the stretched compute used to wait on are now hidden behind it, and what was
exposed communication may vanish. The fast ranks idle at every collective barrier (the optimizer step waits
for all the reduces), so they cannot run ahead by more than a step; in the steady state every step lasts the
straggler's. Without collectives (one GPU) a straggler is just a slower GPU.

A slow link: `slow_link` = s divides every link's bandwidth by s (collective_seconds' own parameter); latencies
stay. Host links (PCIe to host memory, NVMe) are the hardware's and are changed with `--pcie-gbps` instead.

Bytes on the wire: what one rank sends per step, `planner.cluster.wire_bytes` of every collective of the step.

Shared resources: the ranks of a node share its host (PCIe root and memory bandwidth, NVMe, CPU optimizer
throughput); the simulated rank gets its share, the planner's own rule (`planner.cluster.rank_hardware`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cluster import Cluster, collective_seconds, wire_bytes
from planner.costs import STREAMS as PLAN_STREAMS
from planner.errors import UserError

# The schedule's streams: the cost model's, and the network's collectives (planner.schedule's `net` ops)
STREAMS = PLAN_STREAMS + (() if "net" in PLAN_STREAMS else ("net",))


@dataclass(frozen=True, kw_only=True)
class Skew:
    """What-if factors for a cluster; 1.0 is the plan as it is."""
    straggler: float = 1.0    # one rank's GPU compute takes this many times as long
    slow_link: float = 1.0    # every network link runs at 1/slow_link of its bandwidth

    def __post_init__(self):
        for name in ("straggler", "slow_link"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 1.0 <= v <= 1000:
                raise UserError(f"--{name.replace('_', '-')} must be a factor between 1 and 1000 (1: as planned; "
                                f"2: twice as slow), not {v!r}.")


NOMINAL = Skew()

def net_seconds(op, cluster: Cluster, skew: Skew = NOMINAL) -> float:
    """Seconds of one collective op of the schedule on `cluster`."""
    return collective_seconds(op.collective, op.bytes, cluster, slow_link=skew.slow_link)


def op_wire_bytes(op, world: int) -> int:
    """Bytes one rank sends for one op (0 for anything but a collective)."""
    return wire_bytes(op.collective, op.bytes, world) if op.stream == "net" and op.collective else 0


def phase_wire_bytes(phase, world: int) -> int:
    """Bytes one rank sends in one step of a phase: every collective's ring traffic."""
    return sum(op_wire_bytes(op, world) for op in phase.ops)
