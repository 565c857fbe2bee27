"""The measured trace and summary: one named track per stream, one X event per executed op named as the schedule
names it, with its args; a summary whose numbers add up."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest

from planner.costs import STREAMS
from planner.plan import write_atomic
from planner.profile import profile_model
from planner.schedule import build_schedule
from tools.cli import run as cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import CASES, tiny_plan, write_tokens  # noqa: E402

STEPS = 6


def test_trace_and_summary(tmp_path):
    plan = tiny_plan(**CASES["tiers-ascending-reset"])
    write_atomic(str(tmp_path / "plan.json"), plan.to_json())
    write_tokens(tmp_path / "tokens.bin")
    trace, summary = tmp_path / "trace.json", tmp_path / "summary.json"
    assert cli(["train", "--plan", str(tmp_path / "plan.json"), "--data", str(tmp_path / "tokens.bin"), "--cpu",
                "--steps", str(STEPS), "--nvme-dir", str(tmp_path / "nvme"), "--trace", str(trace),
                "--summary", str(summary), "--quiet"]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == sorted(STREAMS + ("steps",))
    walls = [e for e in events if e["ph"] == "X" and e["args"]["kind"] == "step"]
    assert [e["args"]["step"] for e in walls] == list(range(STEPS)) and all(e["dur"] > 0 for e in walls)
    xs = [e for e in events if e["ph"] == "X" and e["args"]["kind"] != "step"]
    assert all(names[e["tid"]] in STREAMS and e["dur"] >= 0 and e["ts"] >= 0 for e in xs)
    assert all(set(e["args"]) >= {"id", "kind", "layer", "bytes"} for e in xs)

    # every op of every step ran exactly once, under its schedule name, on its schedule stream
    sched = build_schedule(plan, profile_model(plan.model))
    for step in range(STEPS):
        block = plan.block_order(0)[step // plan.steps_per_block]
        want = Counter((op.name, op.stream) for op in sched.phases[block].ops)
        got = Counter((e["name"], names[e["tid"]]) for e in xs if e["args"].get("step") == step)
        assert got == want, step
        assert {e["args"]["block"] for e in xs if e["args"].get("step") == step} == {block}

    s = json.loads(summary.read_text())
    assert s["steps"] == STEPS and set(s["step_seconds_by_phase"]) == {"0", "1", "2"}
    assert all(v > 0 for v in s["step_seconds_by_phase"].values())
    for link in ("h2d", "d2h", "nvme_read", "nvme_write"):
        assert s["bytes_by_link"][link] == sum(e["args"]["bytes"] for e in xs if names[e["tid"]] == link)
        assert s["bytes_by_link"][link] > 0   # this plan uses every link
    # h2d moves every streamed layer's weights once per load: count the loads from the schedule
    weight_bytes = {i: 4 * sum(p.numel() for p in layer.parameters()) for i, layer in enumerate(_layers(plan))}
    loads = sum(weight_bytes[e["args"]["layer"]] for e in xs if e["args"]["kind"] == "load_weights")
    fetched = sum(e["args"]["bytes"] for e in xs if e["args"]["kind"] in ("fetch_act", "load_state"))
    uploads = sum(e["args"]["bytes"] for e in xs if e["args"]["kind"] == "upload_weights")
    assert s["bytes_by_link"]["h2d"] == loads + fetched + uploads
    busy = sum(s["busy_seconds_by_stream"].values())
    assert abs(s["overlap_ratio"] - busy / s["wall_seconds"]) < 1e-9 and s["overlap_ratio"] > 0
    assert s["device_peak_bytes"] == max(s["device_peak_bytes_by_phase"].values()) > 0
    # the CPU holds float32 weights: the summary's prediction is the plan's schedule (same window) sized in float32
    from planner.planning import predict
    fp32 = predict(plan, profile_model(plan.model, dtype="float32"), window=sched.window_layers)
    assert s["predicted_peak_bytes_by_phase"] == {str(p.block): p.peak_vram_bytes for p in fp32.phases}
    assert all(s["device_peak_bytes_by_phase"][k] <= v for k, v in s["predicted_peak_bytes_by_phase"].items())
    assert s["weight_dtype"] == "float32"


def _layers(plan):
    from runtime.model import meta_layers
    return meta_layers(plan.model)


def test_overlap_ratio_of_hand_built_spans():
    """Two steps of 1 s and 3 s (4 s of wall). Compute busy 0.9 + 2.5 s; an h2d copy of 0.5 s inside step 0 and one
    of 2 s inside step 1; an NVMe read of 0.6 s belonging to no step (a switch): not counted. Busy 5.9 s over 4 s of
    wall: the streams ran side by side 1.475 times over. Serial spans in the same steps give busy / wall < 1."""
    from runtime.trace import Tracer

    def summary(spans):
        tr = Tracer(enabled=True)
        tr.steps = [(0, 0, 10.0, 11.0), (1, 0, 11.0, 14.0)]
        tr.spans = [{"name": n, "stream": s, "start_s": a, "end_s": b, "id": k, "kind": "x", "layer": 0,
                     "bytes": 0, "step": st, "block": 0} for k, (n, s, a, b, st) in enumerate(spans)]
        return tr.summary(peak_device_bytes=0, phase_peak_bytes={}, predicted_peak_bytes={})
    s = summary([("fwd", "compute", 10.0, 10.9, 0), ("load", "h2d", 10.2, 10.7, 0),
                 ("bwd", "compute", 11.0, 13.5, 1), ("fetch", "h2d", 11.5, 13.5, 1),
                 ("read", "nvme_read", 9.0, 9.6, -1)])
    assert s["wall_seconds"] == pytest.approx(4.0) and s["overlap_ratio"] == pytest.approx(5.9 / 4.0)
    assert s["busy_seconds_by_stream"]["h2d"] == pytest.approx(2.5)
    assert s["step_seconds_by_phase"] == {"0": pytest.approx(2.0)}
    serial = summary([("fwd", "compute", 10.0, 10.5, 0), ("load", "h2d", 10.5, 11.0, 0),
                      ("bwd", "compute", 11.0, 12.0, 1)])
    assert serial["overlap_ratio"] == pytest.approx(2.0 / 4.0)
