"""What the runtime's measured trace and the simulator's trace share beyond op events: the steps track.

Both write Chrome trace JSON (pid 1, a thread per schedule stream, an "X" event per op named as the schedule
names it). Step boundaries are not an op's: with the next step's first NVMe reads issued inside the current one,
op extents overlap from step to step. So each trace ends with a "steps" track, one X event per step with its wall
span, args {kind: "step", step, block}; `blockfit compare` and benchmarks/validate_sim.py take step times from it.
"""
from __future__ import annotations


def step_track(tid: int, steps) -> list[dict]:
    """A "steps" track: one X event per (step, block, start s, seconds), args.kind "step" (runtime and simulator
    traces both carry it; `blockfit compare` reads step times from it)."""
    events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": "steps"}},
              {"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}}]
    for step, block, start_s, seconds in steps:
        events.append({"name": f"step {step}", "cat": "step", "ph": "X", "pid": 1, "tid": tid,
                       "ts": start_s * 1e6, "dur": seconds * 1e6,
                       "args": {"kind": "step", "step": step, "block": block}})
    return events
