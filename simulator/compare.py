"""Measured against predicted: two Chrome traces (the runtime's and the simulator's) or two summaries.

Traces share one layout (see simulator/chrome_trace.py): "X" events named after schedule ops, with args.id the
op's index in its phase's schedule and args.step / args.block where the writer knows them (the runtime and the
simulator both do; step -1 marks a block switch, left out). Without args.step a trace is cut into steps where
an op with id 0 starts. A step's phase is recognised by the lowest layer its backward reaches, which is the
first layer of the block it trains ("L5"), so two traces match phase by phase without knowing the plan. Per
phase we take the median over its steps (a warm-up step does not skew it) of the step's wall time, from the
steps track where the trace has one (planner/tracefmt.py), else from its ops' extent; per op the median duration
by (phase, name), per stream the busy seconds per step.

Summaries are JSON objects keyed by block: the runtime's and the simulator's both carry
"step_seconds_by_phase" {"0": seconds, ...} and "device_peak_bytes_by_phase"; a "phases" list of {"block",
"step_seconds"} is read too.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from planner.errors import UserError, read_json
from planner.tracefmt import TIDS
from simulator.network import STREAMS

SWITCH_KINDS = ("load_state", "save_state")
STEP_KEYS = ("step_seconds", "mean_step_seconds", "median_step_seconds", "step_s")
_STREAM_OF_TID = {v: k for k, v in TIDS.items()}


@dataclass
class Side:
    path: str
    kind: str                                   # trace | summary
    phases: dict = field(default_factory=dict)  # phase key -> step seconds (median)
    steps: dict = field(default_factory=dict)   # phase key -> number of steps seen
    ops: dict = field(default_factory=dict)     # (phase key, op name) -> seconds (median)
    streams: dict = field(default_factory=dict)  # phase key -> {stream: busy seconds per step}
    peaks: dict = field(default_factory=dict)    # phase key -> device peak bytes (summaries)
    blocks: list | None = None                   # the plan's blocks [[first, last], ...], where a summary says


def load(path: str) -> Side:
    raw = read_json(path, "file")
    if isinstance(raw, list) or (isinstance(raw, dict) and "traceEvents" in raw):
        return _from_trace(path, raw["traceEvents"] if isinstance(raw, dict) else raw)
    if isinstance(raw, dict) and ("phases" in raw or "step_seconds_by_phase" in raw):
        return _from_summary(path, raw)
    raise UserError(f"'{path}' is neither a Chrome trace (traceEvents) nor a summary (phases).")


def _stream(ev: dict) -> str:
    return _STREAM_OF_TID.get(ev.get("tid"), str(ev.get("tid")))


def _from_trace(path: str, events: list) -> Side:
    if not isinstance(events, list):
        raise UserError(f"trace '{path}': traceEvents must be a list of events.")
    names = {}  # tid -> track name, from the runtime's or the simulator's metadata
    for ev in events:
        if isinstance(ev, dict) and ev.get("ph") == "M" and ev.get("name") == "thread_name":
            _check_event(path, ev)
            names[ev.get("tid")] = str((ev.get("args") or {}).get("name"))
    xs = []
    walls: dict[int, float] = {}
    for ev in events:
        if not (isinstance(ev, dict) and ev.get("ph") == "X"):
            continue
        _check_event(path, ev)
        args = ev.get("args") or {}
        step = args.get("step")
        if args.get("kind") == "step":  # the steps track (planner/tracefmt.py): a step's wall span
            if isinstance(step, int) and isinstance(ev.get("dur"), (int, float)):
                walls[step] = float(ev["dur"]) * 1e-6
            continue
        try:
            ts, dur = float(ev["ts"]) * 1e-6, float(ev.get("dur", 0.0)) * 1e-6
            op_id = int(args["id"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise UserError(f"trace '{path}': an X event lacks ts or args.id ({ev!r:.120}).") from None
        if not (math.isfinite(ts) and math.isfinite(dur) and dur >= 0):
            raise UserError(f"trace '{path}': an event has a negative or non-finite time ({ev!r:.120}).")
        if args.get("kind") in SWITCH_KINDS or (isinstance(step, int) and step < 0):
            continue
        stream = names.get(ev.get("tid")) or _stream(ev)
        xs.append((ts, op_id, dur, str(ev.get("name")), stream, args.get("kind"), args.get("layer"), step))
    if not xs:
        raise UserError(f"trace '{path}' has no op events.")
    xs.sort(key=lambda x: (x[0], x[1]))
    if all(isinstance(x[7], int) for x in xs):
        by_step: dict[int, list] = {}
        for x in xs:
            by_step.setdefault(x[7], []).append(x)
        steps = list(by_step.values())
    else:
        steps, cur = [], None
        for x in xs:
            if x[1] == 0 or cur is None:
                cur = []
                steps.append(cur)
            cur.append(x)
    side = Side(path=path, kind="trace")
    per_phase: dict[str, list] = {}
    for st in steps:
        bwd = [x[6] for x in st if x[5] == "backward" and x[6] is not None]
        key = f"L{min(bwd)}" if bwd else "fwd-only"
        per_phase.setdefault(key, []).append(st)
    for key, sts in per_phase.items():
        side.phases[key] = statistics.median(walls.get(st[0][7], max(x[0] + x[2] for x in st) - min(x[0] for x in st))
                                             for st in sts)
        side.steps[key] = len(sts)
        busy = {s: 0.0 for s in STREAMS}
        durs: dict[str, list] = {}
        for st in sts:
            for x in st:
                busy[x[4]] = busy.get(x[4], 0.0) + x[2]
                durs.setdefault(x[3], []).append(x[2])
        side.streams[key] = {s: v / len(sts) for s, v in busy.items()}
        for name, ds in durs.items():
            side.ops[(key, name)] = statistics.median(ds)
    return side


def _check_event(path: str, ev: dict) -> None:
    """The fields compare reads from an event, of the types it reads them as (a hand-edited trace says so)."""
    args = ev.get("args")
    ok = args is None or isinstance(args, dict)
    ok = ok and isinstance(ev.get("tid", 0), (int, str)) and not isinstance(ev.get("tid"), bool)
    if ok and isinstance(args, dict):
        layer, step, dur = args.get("layer"), args.get("step"), ev.get("dur", 0)
        ok = (layer is None or (isinstance(layer, int) and not isinstance(layer, bool))) \
            and (step is None or isinstance(step, (int, str))) and isinstance(args.get("kind", ""), (str, type(None)))
        if args.get("kind") == "step" and isinstance(dur, (int, float)):
            ok = ok and math.isfinite(dur) and dur >= 0
    if not ok:
        raise UserError(f"trace '{path}': an event has fields of the wrong type or a negative duration "
                        f"({ev!r:.120}).")


def _from_summary(path: str, raw: dict) -> Side:
    side = Side(path=path, kind="summary", blocks=raw.get("blocks"))
    found: dict[str, list] = {}
    by_phase = raw.get("step_seconds_by_phase")
    if isinstance(by_phase, dict):
        for k, v in by_phase.items():
            if isinstance(v, (int, float)):
                found.setdefault(f"block {k}", []).append(float(v))
    for p in raw.get("phases") or []:
        if isinstance(p, dict) and not by_phase:
            sec = next((p[k] for k in STEP_KEYS if isinstance(p.get(k), (int, float))), None)
            if sec is not None:
                found.setdefault(f"block {p.get('block', len(found))}", []).append(float(sec))
    bad = [v for vs in found.values() for v in vs if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise UserError(f"summary '{path}' holds a negative or non-finite step time ({bad[0]}).")
    if not found:
        raise UserError(f"summary '{path}' has no step time per phase (step_seconds_by_phase, or phases with "
                        f"step_seconds).")
    for key, v in found.items():
        side.phases[key] = statistics.median(v)
        side.steps[key] = len(v)
    peaks = raw.get("device_peak_bytes_by_phase")
    if isinstance(peaks, dict):
        side.peaks = {f"block {k}": v for k, v in peaks.items() if isinstance(v, (int, float))}
    return side


@dataclass
class Comparison:
    measured: Side
    predicted: Side
    phases: list      # (key, steps measured, measured s, predicted s, relative error)
    streams: list     # (key, stream, measured s, predicted s)
    ops: list         # (key, name, measured s, predicted s), largest absolute difference first
    unmatched: list   # phase keys seen on one side only
    peaks: list = field(default_factory=list)   # (key, measured bytes, predicted bytes), from summaries


def compare(measured: Side, predicted: Side) -> Comparison:
    if measured.kind != predicted.kind:
        raise UserError(f"compare two traces or two summaries: '{measured.path}' is a {measured.kind}, "
                        f"'{predicted.path}' a {predicted.kind}.")
    if measured.blocks is not None and predicted.blocks is not None and measured.blocks != predicted.blocks:
        raise UserError(f"'{measured.path}' and '{predicted.path}' are of two plans (blocks {measured.blocks} and "
                        f"{predicted.blocks}); compare a run with the simulation of its own plan.")
    keys = [k for k in measured.phases if k in predicted.phases]
    keys.sort(key=lambda k: (len(k), k))
    extra = sorted(set(measured.phases) - set(predicted.phases))
    if not keys or extra:
        raise UserError(f"'{measured.path}' and '{predicted.path}' are not of the same plan: phases "
                        f"{', '.join(extra or sorted(measured.phases))} of the first are not in the second "
                        f"({', '.join(sorted(predicted.phases))}). Compare a run with the simulation of its own plan.")
    phases = [(k, measured.steps.get(k, 0), measured.phases[k], predicted.phases[k],
               (predicted.phases[k] - measured.phases[k]) / measured.phases[k] if measured.phases[k] > 0 else 0.0)
              for k in keys]
    streams = [(k, s, measured.streams[k].get(s, 0.0), predicted.streams[k].get(s, 0.0))
               for k in keys if k in measured.streams and k in predicted.streams for s in STREAMS
               if measured.streams[k].get(s, 0.0) or predicted.streams[k].get(s, 0.0)]
    ops = [(k, n, m, predicted.ops[(k, n)]) for (k, n), m in measured.ops.items() if (k, n) in predicted.ops]
    ops.sort(key=lambda r: -abs(r[3] - r[2]))
    unmatched = sorted(set(measured.phases) ^ set(predicted.phases))
    peaks = [(k, measured.peaks[k], predicted.peaks[k]) for k in keys if k in measured.peaks and k in predicted.peaks]
    return Comparison(measured=measured, predicted=predicted, phases=phases, streams=streams, ops=ops,
                      unmatched=unmatched, peaks=peaks)


def to_dict(c: Comparison) -> dict:
    return {"measured": c.measured.path, "predicted": c.predicted.path,
            "phases": [{"phase": k, "steps": n, "measured_s": m, "predicted_s": p, "relative_error": e}
                       for k, n, m, p, e in c.phases],
            "streams": [{"phase": k, "stream": s, "measured_s": m, "predicted_s": p} for k, s, m, p in c.streams],
            "ops": [{"phase": k, "name": n, "measured_s": m, "predicted_s": p} for k, n, m, p in c.ops],
            "peaks": [{"phase": k, "measured_bytes": m, "predicted_bytes": p} for k, m, p in c.peaks],
            "unmatched_phases": c.unmatched}


def render(c: Comparison, console, *, top: int = 15) -> None:
    from rich.table import Table
    t = Table(title=f"Per phase: {c.measured.path} (measured) vs {c.predicted.path} (predicted)")
    for col in ("phase", "steps", "measured s", "predicted s", "error"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for k, n, m, p, e in c.phases:
        t.add_row(k, str(n), f"{m:.4g}", f"{p:.4g}", f"{e:+.1%}")
    console.print(t)
    if c.peaks:
        t = Table(title="Per phase: device memory peak")
        for col in ("phase", "measured MiB", "predicted MiB", "diff"):
            t.add_column(col, justify="left" if col == "phase" else "right")
        for k, m, p in c.peaks:
            t.add_row(k, f"{m / 2**20:,.1f}", f"{p / 2**20:,.1f}", f"{(p - m) / m:+.1%}" if m > 0 else "-")
        console.print(t)
    if c.streams:
        t = Table(title="Per stream: busy seconds per step")
        for col in ("phase", "stream", "measured s", "predicted s", "diff"):
            t.add_column(col, justify="left" if col in ("phase", "stream") else "right")
        for k, s, m, p in c.streams:
            t.add_row(k, s, f"{m:.4g}", f"{p:.4g}", f"{(p - m) / m:+.1%}" if m > 0 else "-")
        console.print(t)
    if c.ops:
        t = Table(title=f"Per op: the {min(top, len(c.ops))} largest differences (median seconds)")
        for col in ("phase", "op", "measured s", "predicted s", "diff"):
            t.add_column(col, justify="left" if col in ("phase", "op") else "right")
        for k, n, m, p in c.ops[:top]:
            t.add_row(k, n, f"{m:.3g}", f"{p:.3g}", f"{(p - m) / m:+.0%}" if m > 0 else "-")
        console.print(t)
    if c.unmatched:
        console.print(f"phases on one side only: {', '.join(c.unmatched)}")
