"""The discrete-event simulator: time one training step of a phase from its schedule, op by op.

Every stream (compute, h2d, d2h, nvme_read, nvme_write, cpu_opt, net) is a FIFO queue that runs its ops in list
order, one at a time; an op starts when its stream is free and every op it depends on has finished, and lasts
`planner.costs.op_seconds(op, hw)`, the one cost model the ILP also prices with; a collective on the `net` stream
lasts `planner.cluster.collective_seconds` over the plan's cluster (simulator/network.py: one rank stands for
all, and what a straggler or a slow link changes). Because the schedule lists
every op after its dependencies and each stream keeps list order, the event loop collapses to one pass:
    start[i] = max(finish of the previous op on i's stream, finish of i's deps),  finish[i] = start[i] + dur[i]
which is exactly what a queue-per-stream event simulation computes, at a few hundred nanoseconds per op.

Memory follows the same clock: an op allocates `alloc_bytes` and holds `transient_bytes` from its start,
releases `free_bytes` and the transient at its finish, on top of the phase's static bytes. At equal times a
finishing op frees before a starting op allocates (as a stream would run them), so the peak is the real
overlap of lifetimes rather than the issue-order replay of `planner.schedule.memory_timeline`.

The critical path walks back from the op that finishes last through whatever made each op wait, its binding
dependency or its stream predecessor; the bottleneck is the stream that holds most of that path, named in
words with its utilisation and the kind of work that filled it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from planner.cluster import SINGLE, Cluster, rank_hardware
from planner.costs import op_seconds, overlapped_seconds
from planner.hardware import Hardware
from planner.memory import plan_cap_bytes
from planner.plan import Plan, cycle_rate
from planner.profile import ModelProfile, profile_model
from planner.schedule import PhaseSchedule, Schedule, build_schedule
from simulator.network import NOMINAL, STREAMS, Skew, net_seconds, op_wire_bytes, phase_wire_bytes

MEM_CLASSES = ("weights", "master", "moments", "grads", "prefetch", "activations", "workspace")
_STREAM_INDEX = {s: k for k, s in enumerate(STREAMS)}
_CLASS_INDEX = {c: k for k, c in enumerate(MEM_CLASSES)}

STREAM_WORDS = {"compute": "GPU compute", "h2d": "host-to-device link", "d2h": "device-to-host link",
                "nvme_read": "NVMe reads", "nvme_write": "NVMe writes", "cpu_opt": "CPU optimizer",
                "net": "network"}


def _work_words(stream: str, kind: str, tier: str) -> str:
    """What an op of this kind is doing, for the bottleneck sentence."""
    src = {"cpu": "CPU", "nvme": "NVMe", "gpu": "GPU"}.get(tier, tier or "host")
    return {
        "forward": "forward matmuls", "backward": "backward matmuls", "recompute": "recomputed forwards",
        "optimizer_step": f"the AdamW step on the {src}", "load_weights": f"weights streamed from {src}",
        "read_weights": "weights read from NVMe", "fetch_act": "activations fetched back from CPU",
        "offload_act": "activations offloaded to CPU", "grad_offload": "gradients streamed to CPU",
        "upload_weights": "updated weights uploaded after the CPU optimizer step",
        "write_weights": f"updated weights written back to {src}", "read_state": "optimizer state read from NVMe",
        "write_state": "optimizer state written to NVMe", "load_state": f"optimizer state loaded from {src}",
        "save_state": f"optimizer state saved to {src}", "evict": "evictions",
        "reduce_grads": "gradients reduced over the ranks", "gather_weights": "updated weights gathered from the ranks",
    }.get(kind, kind)


@dataclass(frozen=True, kw_only=True)
class PhaseResult:
    """One simulated training step of one phase (the training of one block)."""
    block: int
    step_seconds: float
    busy_seconds: dict                 # stream -> seconds it was busy
    utilisation: dict                  # stream -> busy / step time
    critical_path: tuple[int, ...]     # op ids, first to last
    critical_seconds: dict             # stream -> seconds of the critical path spent on it
    bottleneck: str                    # e.g. "host-to-device link 93% busy: weights streamed from CPU bound ..."
    peak_bytes: int                    # device bytes at the peak, static included
    peak_at_seconds: float
    peak_breakdown: dict               # bytes by class at the peak
    switch_seconds: float = 0.0        # moving optimizer state when the phase starts
    wire_bytes: int = 0                # bytes one rank sends over the network in the step (simulator/network.py)
    start: tuple[float, ...] = ()      # per op, seconds from the step's start
    finish: tuple[float, ...] = ()
    memory_seconds: tuple[float, ...] = field(default=(), repr=False)  # memory timeline: times ...
    memory_bytes: tuple[int, ...] = field(default=(), repr=False)      # ... and device bytes after each event


@dataclass(frozen=True, kw_only=True)
class Simulation:
    """A whole plan: one step of every phase, and the cycle that trains every block steps_per_block steps."""
    plan: Plan
    hardware: Hardware                 # what one rank has: its share of its node (simulator/network.py)
    schedule: Schedule
    phases: tuple[PhaseResult, ...]
    cycle_seconds: float
    tokens_per_s: float
    skew: Skew = NOMINAL               # the straggler / slow-link what-if the simulation was run under

    @property
    def wire_bytes_per_step(self) -> float:
        """Bytes one rank sends per optimizer step, a mean over the cycle (every phase trains as many steps)."""
        return sum(p.wire_bytes for p in self.phases) / len(self.phases) if self.phases else 0.0

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    @property
    def cap_bytes(self) -> int:
        """What the schedule may use: the plan's VRAM budget less its reserve."""
        return plan_cap_bytes(self.plan)

    def overflows(self) -> list[tuple[int, int]]:
        """(block, bytes over the budget less reserve) for every phase that does not fit."""
        return [(p.block, p.peak_bytes - self.cap_bytes) for p in self.phases if p.peak_bytes > self.cap_bytes]

    def summary(self) -> dict:
        """The simulator's summary JSON, keyed like the runtime's (runtime/trace.py) so `compare` reads both."""
        busy = {s: sum(p.busy_seconds[s] for p in self.phases) for s in STREAMS}
        wall = sum(p.step_seconds for p in self.phases)
        return {"source": "simulator", "model": self.plan.model.name, "gpu": self.hardware.gpu.id,
                "method": self.plan.method, "steps": len(self.phases),
                "blocks": [[b.first, b.last] for b in self.plan.blocks],
                "tokens_per_step": self.plan.shape.tokens_per_step,
                "step_seconds_by_phase": {str(p.block): p.step_seconds for p in self.phases},
                "step_seconds_mean": wall / len(self.phases) if self.phases else 0.0,
                "busy_seconds_by_stream": busy, "wall_seconds": wall,
                "overlap_ratio": sum(busy.values()) / wall if wall > 0 else 0.0,
                "device_peak_bytes": self.peak_bytes,
                "device_peak_bytes_by_phase": {str(p.block): p.peak_bytes for p in self.phases},
                "cycle_seconds": self.cycle_seconds, "tokens_per_s": self.tokens_per_s,
                "gpus": self.plan.world, "nodes": self.plan.cluster.nodes,
                "tokens_per_s_per_gpu": self.tokens_per_s / self.plan.world,
                "wire_bytes_per_step": self.wire_bytes_per_step,
                "straggler": self.skew.straggler, "slow_link": self.skew.slow_link,
                "phases": [{"block": p.block, "step_seconds": p.step_seconds, "switch_seconds": p.switch_seconds,
                            "peak_vram_bytes": p.peak_bytes, "utilisation": p.utilisation,
                            "wire_bytes": p.wire_bytes,
                            "bottleneck": p.bottleneck} for p in self.phases]}


def durations(ops, hw: Hardware, memo: dict | None = None, *, cluster: Cluster = SINGLE,
              skew: Skew = NOMINAL) -> list[float]:
    """Seconds of every op (the straggler's, under `skew`: simulator/network.py); ops of identical size are
    priced once (decoder layers repeat). A memo belongs to one (hw, cluster, skew)."""
    memo = {} if memo is None else memo
    out = []
    for op in ops:
        key = (op.stream, op.kind, op.flops, op.tokens, op.traffic_bytes, op.bytes, op.params, op.collective)
        d = memo.get(key)
        if d is None:
            if op.stream == "net":
                d = net_seconds(op, cluster, skew)
            else:
                d = op_seconds(op, hw) * (skew.straggler if op.stream == "compute" else 1.0)
            memo[key] = d
        out.append(d)
    return out


def simulate_phase(phase: PhaseSchedule, hw: Hardware, *, memo: dict | None = None, keep_timeline: bool = True,
                   cluster: Cluster = SINGLE, skew: Skew = NOMINAL) -> PhaseResult:
    """Simulate one step of `phase` on `hw` and `cluster` (one rank standing for all; under `skew`, the
    straggler's timeline, which every rank shares: simulator/network.py). `memo` shares priced durations across
    phases of one plan."""
    ops = phase.ops
    n = len(ops)
    dur = durations(ops, hw, memo, cluster=cluster, skew=skew)
    sidx = [_STREAM_INDEX[op.stream] for op in ops]
    if hw.gpu.shared_cores:
        dur = shared_core_durations(ops, sidx, dur, hw.gpu.shared_cores,
                                    cpu_seconds=side_cpu_seconds(ops, dur, hw, cluster.world))
    start, finish, why, busy = _one_pass(ops, sidx, dur)
    step = max(finish) if n else 0.0
    path = _critical_path(finish, why)
    crit = [0.0] * len(STREAMS)
    for i in path:
        crit[sidx[i]] += dur[i]
    util = {name: (busy[k] / step if step > 0 else 0.0) for k, name in enumerate(STREAMS)}
    peak, peak_t, breakdown, mt, mb = _memory(phase, start, finish, dur)
    return PhaseResult(
        block=phase.block, step_seconds=step, busy_seconds=dict(zip(STREAMS, busy)), utilisation=util,
        critical_path=tuple(path), critical_seconds=dict(zip(STREAMS, crit)),
        bottleneck=describe_bottleneck(ops, path, dur, crit, util), peak_bytes=peak, peak_at_seconds=peak_t,
        peak_breakdown=breakdown, switch_seconds=switch_seconds(phase, hw),
        wire_bytes=phase_wire_bytes(phase, cluster.world), start=tuple(start),
        finish=tuple(finish), memory_seconds=tuple(mt) if keep_timeline else (),
        memory_bytes=tuple(mb) if keep_timeline else ())


def _one_pass(ops, sidx, dur):
    """The event loop (module docstring): per op its start, finish and the op it waited for; per stream its busy
    seconds."""
    n = len(ops)
    start = [0.0] * n
    finish = [0.0] * n
    why = [-1] * n                     # the op that made op i wait (-1: nothing did)
    free_at = [0.0] * len(STREAMS)
    last_on = [-1] * len(STREAMS)
    busy = [0.0] * len(STREAMS)
    for i, op in enumerate(ops):
        s = sidx[i]
        t, w = free_at[s], last_on[s]
        for d in op.deps:
            if d >= i:
                raise ValueError(f"schedule op {i} ({op.name}) depends on op {d}, which is not listed before it")
            if finish[d] > t:
                t, w = finish[d], d
        start[i] = t
        f = finish[i] = t + dur[i]
        why[i] = w
        free_at[s] = f
        last_on[s] = i
        busy[s] += dur[i]
    return start, finish, why, busy


# Streams whose work runs on the compute cores when the device is a CPU (GPU.shared_cores): the runtime's copy
# threads (memcpy), gloo's threads and the CPU AdamW thread. NVMe reads and writes are O_DIRECT requests the CPU
# only waits for.
SHARED_STREAMS = ("h2d", "d2h", "cpu_opt", "net")


def side_cpu_seconds(ops, dur: list[float], hw: Hardware, world: int) -> list[float]:
    """CPU seconds each op's threads take from the shared cores (shared_core_durations): a copy or a CPU optimizer
    step is CPU work for as long as it runs; a collective only for its wire bytes at GPU.collective_cpu_gbps (its
    sends, receives and sums; the rest of its duration it waits for the other ranks), or, not measured, for its
    whole duration."""
    rate = hw.gpu.collective_cpu_gbps * 1e9
    return [min(d, op_wire_bytes(op, world) / rate) if op.stream == "net" and rate > 0 else d
            for op, d in zip(ops, dur)]


def shared_core_durations(ops, sidx, dur: list[float], cores: int, rounds: int = 8, *,
                          cpu_seconds: list[float] | None = None) -> list[float]:
    """Durations of `ops` when compute runs on `cores` CPU cores that the SHARED_STREAMS' threads also use: each
    compute op is longer by the work of the side ops it overlaps, over `cores` (a copy thread beside one compute
    thread on one core takes the core for as long as it copies; beside two on two cores, half of it). A side op
    whose CPU work (`cpu_seconds`, default its duration) is less than its duration spreads it evenly over the
    duration. The overlap depends on the timeline it changes, so this iterates the event loop from the priced
    durations until no compute op moves by more than a microsecond."""
    work = dur if cpu_seconds is None else cpu_seconds
    comp = np.array([i for i, op in enumerate(ops) if op.stream == "compute"], dtype=np.int64)
    side = np.array([i for i, op in enumerate(ops) if op.stream in SHARED_STREAMS and dur[i] > 0 and work[i] > 0],
                    dtype=np.int64)
    if not len(comp) or not len(side):
        return dur
    base = np.asarray(dur, dtype=np.float64)
    share = np.asarray(work, dtype=np.float64)[side] / base[side]
    out = base.copy()
    for _ in range(rounds):
        start, finish = (np.asarray(x) for x in _one_pass(ops, sidx, out)[:2])
        overlap = np.minimum.outer(finish[comp], finish[side]) - np.maximum.outer(start[comp], start[side])
        new = base[comp] + (np.clip(overlap, 0.0, None) * share).sum(axis=1) / cores
        moved = np.max(np.abs(new - out[comp]))
        out[comp] = new
        if moved < 1e-6:
            break
    return out.tolist()


def switch_seconds(phase: PhaseSchedule, hw: Hardware) -> float:
    """The block switch: state loads and saves have no dependencies, so each stream runs its own back to back."""
    return overlapped_seconds(phase.switch_ops, hw)


def _critical_path(finish: list[float], why: list[int]) -> list[int]:
    if not finish:
        return []
    i = max(range(len(finish)), key=finish.__getitem__)
    path = []
    while i >= 0:
        path.append(i)
        i = why[i]
    return path[::-1]


def describe_bottleneck(ops, path, dur, crit, util) -> str:
    """The stream holding most of the critical path, its utilisation, and the kind of work that filled it."""
    if not path or sum(crit) <= 0:
        return "nothing to do: the phase is empty"
    k = max(range(len(STREAMS)), key=crit.__getitem__)
    stream = STREAMS[k]
    by_kind: dict[tuple[str, str], float] = {}
    for i in path:
        op = ops[i]
        if op.stream == stream:
            by_kind[(op.kind, op.tier)] = by_kind.get((op.kind, op.tier), 0.0) + dur[i]
    kind, tier = max(by_kind, key=by_kind.get)
    share = crit[k] / sum(crit)
    return (f"{STREAM_WORDS[stream]} {util[stream]:.0%} busy: {_work_words(stream, kind, tier)} bound this phase "
            f"({share:.0%} of the critical path)")


def _memory(phase: PhaseSchedule, start, finish, dur):
    """Device-memory timeline on the simulated clock: (peak, its time, breakdown at it, times, bytes)."""
    static = {c: int(phase.static.get(c, 0)) for c in MEM_CLASSES}
    base = sum(static.values())
    events = []   # (time, order at equal times, class, bytes)
    w = _CLASS_INDEX["workspace"]
    for i, op in enumerate(phase.ops):
        end_key = 0 if dur[i] > 0 else 2   # a zero-length op frees after its own allocation
        c = _CLASS_INDEX.get(op.mem_class, w)
        if op.alloc_bytes:
            events.append((start[i], 1, c, op.alloc_bytes))
        if op.transient_bytes:
            events.append((start[i], 1, w, op.transient_bytes))
            events.append((finish[i], end_key, w, -op.transient_bytes))
        if op.free_bytes:
            events.append((finish[i], end_key, c, -op.free_bytes))
    if not events:
        return base, 0.0, static, [0.0], [base]
    t, order, cls, delta = zip(*events)
    ta, oa = np.asarray(t), np.asarray(order)
    idx = np.lexsort((oa, ta))
    da = np.asarray(delta, dtype=np.int64)[idx]
    live = base + np.cumsum(da)
    k = int(np.argmax(live))
    peak = int(live[k])
    if peak < base:
        return base, 0.0, static, [0.0], [base]
    ca = np.asarray(cls)[idx]
    by = np.bincount(ca[:k + 1], weights=da[:k + 1], minlength=len(MEM_CLASSES))
    breakdown = {c: static[c] + int(round(by[j])) for j, c in enumerate(MEM_CLASSES)}
    return peak, float(ta[idx[k]]), breakdown, ta[idx].tolist(), live.tolist()


def simulate(plan: Plan, hw: Hardware | None = None, *, profile: ModelProfile | None = None,
             schedule: Schedule | None = None, keep_timeline: bool = True, skew: Skew = NOMINAL) -> Simulation:
    """Simulate one step of every phase of `plan` on `hw` (default: the plan's own hardware) and its cluster, and
    the cycle: every block trained steps_per_block steps, each phase preceded by its switch. Tokens per second
    count every rank's tokens (plan.shape.tokens_per_step). `hw` describes a node (its GPU model and its host);
    the simulated rank gets its share of the node."""
    hw = rank_hardware(hw or plan.hardware, plan.cluster)
    if schedule is None:
        schedule = build_schedule(plan, profile or profile_model(plan.model))
    memo: dict = {}
    phases = tuple(simulate_phase(ph, hw, memo=memo, keep_timeline=keep_timeline, cluster=plan.cluster, skew=skew)
                   for ph in schedule.phases)
    cycle, rate = cycle_rate(phases, steps_per_block=plan.steps_per_block, tokens_per_step=plan.shape.tokens_per_step)
    return Simulation(plan=plan, hardware=hw, schedule=schedule, phases=phases, cycle_seconds=cycle,
                      tokens_per_s=rate, skew=skew)
