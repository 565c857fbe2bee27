"""Chrome trace JSON of a simulation, in the runtime's layout, so the two open side by side in Perfetto or
chrome://tracing and `blockfit compare` can match them op by op.

Layout (shared with runtime/'s measured trace): pid 1; one tid per stream, named by "thread_name" metadata
events compute, h2d, d2h, nvme_read, nvme_write, cpu_opt; one "X" (complete) event per op, named exactly
op.name, ts and dur in microseconds, args {id, kind, layer, bytes} and, as the runtime adds them, {step, block}
(step -1 for a block switch); a last "steps" track (planner/tracefmt.py) holds each step's span. The simulated
trace holds one step of every phase, in the order the first cycle trains the blocks, each phase after its block
switch.
"""
from __future__ import annotations

import json

from planner.plan import write_atomic
from planner.tracefmt import PID, STEPS_TID, TIDS, header, step_track
from simulator.engine import STREAMS, durations

# The network's track: planner/tracefmt.py's where it has one, else one after the steps track
NET_TID = TIDS.get("net", STEPS_TID + 1)


def _tid(stream: str) -> int:
    return NET_TID if stream == "net" else TIDS[stream]


def _event(op, ts_s: float, dur_s: float, step: int, block: int) -> dict:
    return {"name": op.name, "cat": op.kind, "ph": "X", "pid": PID, "tid": _tid(op.stream),
            "ts": round(ts_s * 1e6, 3), "dur": round(dur_s * 1e6, 3),
            "args": {"id": op.id, "kind": op.kind, "layer": op.layer, "bytes": op.bytes, "step": step,
                     "block": block}}


def trace_events(sim) -> list[dict]:
    """Metadata events naming the process and the tracks, then every op of one step of every phase."""
    events = header("blockfit")
    if "net" not in TIDS and sim.plan.world > 1:
        events += [{"name": "thread_name", "ph": "M", "pid": PID, "tid": NET_TID, "args": {"name": "net"}},
                   {"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": NET_TID,
                    "args": {"sort_index": NET_TID}}]
    by_block = {p.block: p for p in sim.phases}
    sched = {ph.block: ph for ph in sim.schedule.phases}
    t0 = 0.0
    steps = []
    for step, k in enumerate(sim.plan.block_order(0)):
        res, ph = by_block[k], sched[k]
        free = dict.fromkeys(STREAMS, t0)
        for op, d in zip(ph.switch_ops, durations(ph.switch_ops, sim.hardware)):
            # no dependencies: each stream runs its share back to back
            events.append(_event(op, free[op.stream], d, -1, k))
            free[op.stream] += d
        t0 += res.switch_seconds
        for op, a, b in zip(ph.ops, res.start, res.finish):
            events.append(_event(op, t0 + a, b - a, step, k))
        steps.append((step, k, t0, res.step_seconds))
        t0 += res.step_seconds
    return events + step_track(steps)


def to_json(sim) -> str:
    return json.dumps({"traceEvents": trace_events(sim), "displayTimeUnit": "ms",
                       "otherData": {"source": "blockfit simulator", "model": sim.plan.model.name,
                                     "gpu": sim.hardware.gpu.id}})


def write_trace(path: str, sim) -> None:
    write_atomic(path, to_json(sim))

