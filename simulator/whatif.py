"""What-if: a plan on other hardware or at another shape, kept as it is or planned again.

Keeping the plan answers "how would this exact placement do there": the schedule is rebuilt at the new shape
(sizes change with micro-batch and sequence), timed on the new hardware, and checked against the new budget;
if a phase no longer fits, `overflow_lines` names it and the bytes it is over by. `replan=True` asks the planner
(planner.planning.make_plan) for the best plan under the new hardware and shape instead.

Hardware overrides start from the plan's own hardware, so what is not overridden (host RAM, NVMe, the CPU's
AdamW rate, efficiencies) stays: `--gpu` swaps the GPU's catalog record, `--hardware` a whole calibrated profile.
A new GPU or profile without `--vram` takes the new card's VRAM as the budget.

On a cluster, `straggler` (one rank's GPU compute k times slower) and `slow_link` (the network's links at 1/s of
their bandwidth) keep the plan and re-time it; simulator/network.py explains why a straggler's own timeline is
every rank's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner.cluster import INTERCONNECTS
from planner.errors import UserError, check_positive
from planner.hardware import GIB, Hardware, load_gpu, load_hardware_file, with_overrides
from planner.plan import Plan, Shape
from planner.planning import Request, make_plan
from planner.profile import ModelProfile, profile_model
from simulator.engine import Simulation, simulate
from simulator.network import Skew


@dataclass(frozen=True, kw_only=True)
class Overrides:
    gpu: str | None = None
    hardware_file: str | None = None
    vram_gib: float | None = None
    pcie_gbps: float | None = None       # both directions of the host link
    nvme_gbps: float | None = None       # NVMe read and write
    host_ram_gib: float | None = None
    micro_batch: int | None = None
    seq_len: int | None = None
    straggler: float | None = None       # one rank's compute this many times slower (simulator/network.py)
    slow_link: float | None = None       # network links at 1/slow_link of their bandwidth

    def any(self) -> bool:
        return any(v is not None for v in dataclasses.asdict(self).values())

    def skew(self) -> Skew:
        """The cluster what-if, validated (UserError for a factor below 1 or absurd)."""
        return Skew(straggler=1.0 if self.straggler is None else self.straggler,
                    slow_link=1.0 if self.slow_link is None else self.slow_link)


def hardware(plan: Plan, ov: Overrides) -> Hardware:
    """The plan's hardware with the overrides applied (validated here, at the edge)."""
    check_positive("--nvme-gbps", ov.nvme_gbps, upper=1000)
    if ov.gpu is not None and ov.hardware_file is not None:
        raise UserError("give either --gpu or --hardware, not both.")
    hw = plan.hardware
    if ov.hardware_file is not None:
        hw = load_hardware_file(ov.hardware_file)
    elif ov.gpu is not None:
        hw = dataclasses.replace(hw, gpu=load_gpu(ov.gpu), calibrated=False)
    return with_overrides(hw, vram_gib=ov.vram_gib, pcie_gbps=ov.pcie_gbps, nvme_read_gbps=ov.nvme_gbps,
                          nvme_write_gbps=ov.nvme_gbps, host_ram_gib=ov.host_ram_gib)


def _budget_gib(plan: Plan, hw: Hardware, ov: Overrides) -> float:
    if ov.vram_gib is not None:
        return ov.vram_gib
    if ov.gpu is not None or ov.hardware_file is not None:
        return hw.gpu.vram_gib
    return plan.budget_bytes / GIB


def _shape(plan: Plan, ov: Overrides) -> Shape:
    check_positive("--micro-batch", ov.micro_batch, integer=True, upper=4096)
    check_positive("--seq", ov.seq_len, integer=True, upper=1 << 20)
    s = plan.shape
    batch = s.micro_batch * s.grad_accum
    mb = ov.micro_batch or s.micro_batch
    seq = ov.seq_len or s.seq_len
    if batch % mb:
        raise UserError(f"--micro-batch {mb} does not divide the plan's batch of {batch} sequences per step "
                        f"(micro-batch {s.micro_batch} x {s.grad_accum} accumulation).")
    if seq > plan.model.max_seq:
        raise UserError(f"--seq {seq} is longer than the model allows ({plan.model.max_seq}).")
    return Shape(micro_batch=mb, seq_len=seq, grad_accum=batch // mb, gpus=s.gpus)


def keep_plan(plan: Plan, ov: Overrides) -> Plan:
    """The same placement and blocks under new hardware, budget and shape."""
    hw = hardware(plan, ov)
    budget = int(_budget_gib(plan, hw, ov) * GIB)
    if budget <= plan.reserve_bytes:
        raise UserError(f"the VRAM budget ({budget / GIB:g} GiB) must exceed the plan's reserve "
                        f"({plan.reserve_bytes / GIB:g} GiB).")
    return dataclasses.replace(plan, hardware=hw, budget_bytes=budget, shape=_shape(plan, ov))


def replan(plan: Plan, ov: Overrides, profile: ModelProfile | None = None, *, time_limit_s: float = 10.0) -> Plan:
    """A new plan from the planner for the new hardware and shape, with the plan's other choices kept."""
    hw = hardware(plan, ov)
    s = _shape(plan, ov)
    cl = plan.cluster
    inter = cl.inter
    named = inter is not None and INTERCONNECTS.get(inter.name) == inter
    req = Request(method=plan.method, vram_gib=_budget_gib(plan, hw, ov), reserve_gib=plan.reserve_bytes / GIB,
                  seq_len=s.seq_len, batch=s.micro_batch * s.grad_accum * s.gpus,   # the global batch
                  gpus=cl.world, nodes=cl.nodes, ports_per_node=cl.ports_per_node, shard_state=plan.shard_state,
                  interconnect=inter.name if named else None,
                  interconnect_gbps=None if inter is None or named else inter.gbps,
                  micro_batch=ov.micro_batch, steps_per_block=plan.steps_per_block, order=plan.order, seed=plan.seed,
                  switch_state=plan.switch_state, time_limit_s=time_limit_s,
                  train_embeddings=plan.method == "bcd" and plan.blocks[0].first == 0)  # a pretraining plan
    return make_plan(plan.model, hw, req, profile or profile_model(plan.model))


def what_if(plan: Plan, ov: Overrides, *, replan_: bool = False,
            profile: ModelProfile | None = None) -> tuple[Simulation, Simulation]:
    """(the plan as it was, simulated on its own hardware; the what-if, simulated)."""
    prof = profile or profile_model(plan.model)
    skew = ov.skew()
    before = simulate(plan, profile=prof)
    after_plan = replan(plan, ov, prof) if replan_ else keep_plan(plan, ov)
    return before, simulate(after_plan, profile=prof, skew=skew)
