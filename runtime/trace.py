"""The measured trace: every op's span on its stream, as Chrome trace JSON, and a summary of the run.

One track (tid) per schedule stream (compute, h2d, d2h, nvme_read, nvme_write, cpu_opt), named with thread_name
metadata events; each op is an "X" event named exactly as the schedule names it ("fwd L3 mb0"), so the runtime's
trace and the simulator's line up, with args {id, kind, layer, bytes, step, block}; a last "steps" track holds each
step's wall span as the trainer timed it (args.kind "step"). Open it in chrome://tracing or
https://ui.perfetto.dev.

Host work is timed with perf_counter on the thread that does it. Work on CUDA streams is timed with CUDA events
recorded around it, placed on the host clock at the step's end from an anchor event recorded when the step began.

The summary: mean step seconds per phase (block), bytes moved per link, the device-memory peak, and the overlap
ratio = busy seconds summed over all streams / wall seconds of the steps (1.0: nothing overlapped; higher: streams
ran side by side).
"""
from __future__ import annotations

import json
import threading
import time

import torch

from planner.costs import STREAMS
from planner.tracefmt import PID, STEPS_TID, TIDS, header, step_track

LINKS = ("h2d", "d2h", "nvme_read", "nvme_write")
NET_TID = TIDS.get("net", STEPS_TID + 1)   # the collectives' track (a data-parallel run), as the simulator's


class Tracer:
    def __init__(self, *, enabled: bool):
        self.enabled = enabled
        self.origin_s = time.perf_counter()
        self.spans: list[dict] = []
        self.steps: list[tuple[int, int, float, float]] = []   # (step, block, start_s, end_s)
        self._pending: list[tuple] = []                         # CUDA spans resolved at the step's end
        self._lock = threading.Lock()
        self._ctx = (-1, -1)                                    # (step, block) of what runs now; -1: a switch
        self._anchor = None

    # -- recording (called by the executor, from any thread) ---------------------------------------------------

    def begin(self, gpu):
        if not self.enabled:
            return None
        if gpu is None:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(gpu)
        return ev

    def end(self, op, token, gpu, nbytes: int, ctx=None) -> None:
        """`ctx`: (step, block) the op belongs to, when not the step running now (a next step's early read)."""
        if not self.enabled:
            return
        ctx = ctx or self._ctx
        if gpu is None:
            self._add(op, token, time.perf_counter(), nbytes, ctx)
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(gpu)
        with self._lock:
            self._pending.append((op, token, ev, nbytes, ctx))

    def _add(self, op, start_s: float, end_s: float, nbytes: int, ctx) -> None:
        span = {"name": op.name, "stream": op.stream, "start_s": start_s - self.origin_s,
                "end_s": end_s - self.origin_s, "id": op.id, "kind": op.kind, "layer": op.layer, "bytes": nbytes,
                "step": ctx[0], "block": ctx[1]}
        with self._lock:
            self.spans.append(span)

    # -- steps (called by the trainer) -------------------------------------------------------------------------

    def begin_step(self, step: int, block: int) -> float:
        self._ctx = (step, block)
        start = time.perf_counter()
        if self.enabled and torch.cuda.is_available() and torch.cuda.is_initialized():
            self._anchor = (torch.cuda.Event(enable_timing=True), time.perf_counter())
            self._anchor[0].record()
        return start

    def end_step(self, step: int, block: int, start_s: float) -> float:
        """Call after the step's results are on the host (its GPU work is done); returns its wall seconds."""
        end = time.perf_counter()
        self.steps.append((step, block, start_s - self.origin_s, end - self.origin_s))
        self._resolve()
        self._ctx = (-1, -1)
        return end - start_s

    def _resolve(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        anchor, anchor_s = self._anchor
        for op, ev0, ev1, nbytes, ctx in pending:
            ev1.synchronize()
            self._add(op, anchor_s + anchor.elapsed_time(ev0) / 1e3, anchor_s + anchor.elapsed_time(ev1) / 1e3,
                      nbytes, ctx)

    # -- output -------------------------------------------------------------------------------------------------

    def chrome_trace(self) -> dict:
        events = header("blockfit runtime")
        if "net" not in TIDS and any(sp["stream"] == "net" for sp in self.spans):
            events.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": NET_TID, "args": {"name": "net"}})
        for sp in self.spans:
            tid = NET_TID if sp["stream"] == "net" else TIDS[sp["stream"]]
            events.append({"name": sp["name"], "ph": "X", "pid": PID, "tid": tid,
                           "ts": sp["start_s"] * 1e6, "dur": max(0.0, sp["end_s"] - sp["start_s"]) * 1e6,
                           "args": {k: sp[k] for k in ("id", "kind", "layer", "bytes", "step", "block")}})
        # the steps as the trainer timed them: the next step's early NVMe reads run inside this one's span
        events += step_track([(s, b, a, e - a) for s, b, a, e in self.steps])
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def summary(self, *, peak_device_bytes: int, phase_peak_bytes: dict, predicted_peak_bytes: dict,
                max_memory_allocated_bytes: int | None = None) -> dict:
        by_block: dict[int, list[float]] = {}
        for _, block, a, b in self.steps:
            by_block.setdefault(block, []).append(b - a)
        wall = sum(b - a for _, _, a, b in self.steps)
        in_steps = [sp for sp in self.spans if sp["step"] >= 0]
        busy = {s: sum(sp["end_s"] - sp["start_s"] for sp in in_steps if sp["stream"] == s) for s in STREAMS}
        return {
            "steps": len(self.steps),
            "step_seconds_by_phase": {str(k): sum(v) / len(v) for k, v in sorted(by_block.items())},
            "step_seconds_mean": wall / len(self.steps) if self.steps else 0.0,
            "bytes_by_link": {s: sum(sp["bytes"] for sp in self.spans if sp["stream"] == s) for s in LINKS},
            # what this rank sent in collectives (planner.cluster.wire_bytes of each net op's buffer)
            "net_bytes": sum(sp["bytes"] for sp in self.spans if sp["stream"] == "net"),
            "busy_seconds_by_stream": busy,
            "wall_seconds": wall,
            "overlap_ratio": sum(busy.values()) / wall if wall > 0 else 0.0,
            "device_peak_bytes": peak_device_bytes,
            "device_peak_bytes_by_phase": {str(k): v for k, v in sorted(phase_peak_bytes.items())},
            "predicted_peak_bytes_by_phase": {str(k): v for k, v in sorted(predicted_peak_bytes.items())},
            "max_memory_allocated_bytes": max_memory_allocated_bytes,
        }


def write_json(path: str, obj: dict) -> None:
    from planner.plan import write_atomic
    write_atomic(path, json.dumps(obj, indent=1))
