"""A shortcut for sweeps: simulate three micro-batches of a step and extend the repeating pattern to g.

A step of g micro-batches is the same op pattern g times (the same layers, placements and sizes), followed by
the optimizer tail. The engine's recurrence (start = max of stream predecessor and dependencies, finish = start +
duration) is linear in the max-plus sense: shift every time of one micro-batch by d and whatever depends on it
shifts by d. So once micro-batch 2 runs exactly as micro-batch 1 shifted by d (every op: same start offset,
same finish offset), every later micro-batch does too, and a step of g micro-batches lasts what the three-
micro-batch step lasts plus (g - 3) * d; streams are busy (g - 3) more periods; memory repeats period after
period, so the peak is the same. The check is exact (to rounding), op by op; a phase that is not yet periodic
after two micro-batches is simulated in full instead. tests/simulator/test_periodic.py compares both ways.
Only the critical path's split among streams is estimated (from micro-batch 2's share of the played path): where
two predecessors finish at the same instant the path may follow either, so its split was never unique.

It pays where the planner's schedule is the cost: building it is about 80% of a sweep configuration, and a
step of 8 micro-batches builds and plays 3.
"""
from __future__ import annotations

import dataclasses

from planner.cluster import rank_hardware
from planner.hardware import Hardware
from planner.plan import Plan, cycle_rate
from planner.profile import ModelProfile, profile_model
from planner.schedule import PhaseSchedule, Schedule, build_schedule
from simulator.engine import (
    STREAMS,
    PhaseResult,
    Simulation,
    describe_bottleneck,
    durations,
    simulate,
    simulate_phase,
)
from simulator.network import NOMINAL, Skew

PLAYED = 3


def _extend(ph: PhaseSchedule, r: PhaseResult, extra: int, hw: Hardware, memo: dict, **net) -> PhaseResult | None:
    """The result for `extra` more micro-batches, or None when micro-batch 2 does not repeat micro-batch 1."""
    ops = ph.ops
    m1 = [i for i, op in enumerate(ops) if op.micro_batch == PLAYED - 2]
    m2 = [i for i, op in enumerate(ops) if op.micro_batch == PLAYED - 1]
    if not m1 or len(m1) != len(m2):
        return None
    d = r.start[m2[0]] - r.start[m1[0]]
    tol = 1e-9 * max(r.step_seconds, 1e-9)
    for i, j in zip(m1, m2):
        if ops[i].kind != ops[j].kind or ops[i].layer != ops[j].layer or \
                abs(r.start[j] - r.start[i] - d) > tol or abs(r.finish[j] - r.finish[i] - d) > tol:
            return None
    dur = durations(ops, hw, memo, **net)
    shift = extra * d
    # the last micro-batch and the tail move by `shift`; the first micro-batches stay where they are
    late = max((r.finish[i] for i, op in enumerate(ops) if op.micro_batch in (PLAYED - 1, -1)), default=0.0)
    early = max((r.finish[i] for i, op in enumerate(ops) if 0 <= op.micro_batch < PLAYED - 1), default=0.0)
    step = max(late + shift, early)
    per = dict.fromkeys(STREAMS, 0.0)
    for j in m2:
        per[ops[j].stream] += dur[j]
    busy = {s: r.busy_seconds[s] + extra * per[s] for s in STREAMS}
    # Each added period lengthens the critical path by d; split it by streams as micro-batch 2's part of the
    # played path is split (ties between equal finishes make the exact path's split arbitrary anyway).
    crit_per = dict.fromkeys(STREAMS, 0.0)
    for i in r.critical_path:
        if ops[i].micro_batch == PLAYED - 1:
            crit_per[ops[i].stream] += dur[i]
    if sum(crit_per.values()) <= 0:
        crit_per = dict(per)
    total = sum(crit_per.values())
    crit = {s: r.critical_seconds[s] + extra * d * crit_per[s] / total for s in STREAMS}
    util = {s: busy[s] / step if step > 0 else 0.0 for s in STREAMS}
    words = describe_bottleneck(ops, r.critical_path, dur, [crit[s] for s in STREAMS], util)
    return dataclasses.replace(r, step_seconds=step, busy_seconds=busy, utilisation=util, critical_seconds=crit,
                               bottleneck=words, start=(), finish=())


def simulate_repeating(plan: Plan, hw: Hardware | None = None, *, profile: ModelProfile | None = None,
                       skew: Skew = NOMINAL, schedule: Schedule | None = None) -> Simulation:
    """What simulate(plan, keep_timeline=False, skew=skew) gives, from a schedule of at most three micro-batches.
    The result's schedule is the one played; its phases carry no per-op times or memory timeline. `schedule`:
    the played schedule when the caller has it (short_schedule; it does not depend on the cluster's layout or
    links, only on the world size, so a search over layouts builds it once)."""
    node = hw or plan.hardware
    hw = rank_hardware(node, plan.cluster)    # simulate() takes the node's and shares it itself
    prof = profile or profile_model(plan.model)
    g = plan.shape.grad_accum
    if g <= PLAYED:
        return simulate(plan, node, profile=prof, schedule=schedule, keep_timeline=False, skew=skew)
    sched = schedule or short_schedule(plan, prof)
    memo: dict = {}
    net = dict(cluster=plan.cluster, skew=skew)
    phases = []
    for ph in sched.phases:
        r = _extend(ph, simulate_phase(ph, hw, memo=memo, keep_timeline=False, **net), g - PLAYED, hw, memo, **net)
        if r is None:
            return simulate(plan, node, profile=prof, keep_timeline=False, skew=skew)
        phases.append(r)
    cycle, rate = cycle_rate(phases, steps_per_block=plan.steps_per_block, tokens_per_step=plan.shape.tokens_per_step)
    return Simulation(plan=plan, hardware=hw, schedule=sched, phases=tuple(phases), cycle_seconds=cycle,
                      tokens_per_s=rate, skew=skew)


def short_schedule(plan: Plan, prof: ModelProfile) -> Schedule:
    """The schedule simulate_repeating plays: the whole step's when it has at most PLAYED micro-batches."""
    if plan.shape.grad_accum <= PLAYED:
        return build_schedule(plan, prof)
    return build_schedule(dataclasses.replace(plan, shape=dataclasses.replace(plan.shape, grad_accum=PLAYED)), prof)
