"""The Chrome trace layout the runtime's measured trace and the simulator's share, so both open side by side in
Perfetto and `blockfit compare` matches them op by op.

pid 1; a thread per schedule stream (TIDS, named by thread_name metadata events); an "X" event per op named as
the schedule names it. Step boundaries are not an op's: with the next step's first NVMe reads issued inside the
current one, op extents overlap from step to step. So each trace ends with a "steps" track, one X event per step
with its wall span, args {kind: "step", step, block}; `blockfit compare` and benchmarks/validate_sim.py take step
times from it.
"""
from __future__ import annotations

from planner.costs import STREAMS

PID = 1
TIDS = {s: k + 1 for k, s in enumerate(STREAMS)}   # compute=1, h2d=2, ...
STEPS_TID = len(STREAMS) + 1


def _track(tid: int, name: str) -> list[dict]:
    return [{"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}},
            {"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}}]


def header(process: str) -> list[dict]:
    """The process and one named track per stream."""
    events = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": process}}]
    for s in STREAMS:
        events += _track(TIDS[s], s)
    return events


def step_track(steps) -> list[dict]:
    """The "steps" track: one X event per (step, block, start s, seconds), args.kind "step"."""
    events = _track(STEPS_TID, "steps")
    for step, block, start_s, seconds in steps:
        events.append({"name": f"step {step}", "cat": "step", "ph": "X", "pid": PID, "tid": STEPS_TID,
                       "ts": start_s * 1e6, "dur": seconds * 1e6,
                       "args": {"kind": "step", "step": step, "block": block}})
    return events
