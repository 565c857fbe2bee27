"""simulator/chrome_trace.py: the trace is Chrome trace JSON whose tracks and op names are the schedule's."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.planning import Request, make_plan
from planner.profile import profile_model
from simulator.chrome_trace import PID, to_json
from simulator.engine import simulate

STREAM_NAMES = {"compute", "h2d", "d2h", "nvme_read", "nvme_write", "cpu_opt"}


@pytest.fixture(scope="module")
def sim():
    # 1B in 8 GiB: streamed weights, recompute and several blocks, so several tracks carry ops
    cfg = CATALOG["1b"]
    prof = profile_model(cfg)
    plan = make_plan(cfg, make_hardware(gpu="rtx4090"), Request(vram_gib=8, seq_len=1024, batch=4, time_limit_s=2.0),
                     prof)
    assert len(plan.blocks) > 1
    return simulate(plan, profile=prof)


def test_trace_is_chrome_json_with_the_schedules_tracks_and_ops(sim):
    doc = json.loads(to_json(sim))
    events = doc["traceEvents"]
    assert all({"name", "ph", "pid"} <= set(e) for e in events)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(tracks.values()) == STREAM_NAMES | {"steps"} and len(tracks) == 7
    steps = [e for e in events if e["ph"] == "X" and e["args"]["kind"] == "step"]
    assert [tracks[e["tid"]] for e in steps] == ["steps"] * len(sim.phases)
    xs = [e for e in events if e["ph"] == "X" and e["args"]["kind"] != "step"]
    assert all(e["pid"] == PID and e["dur"] >= 0 and e["ts"] >= 0 for e in xs)
    for ph in sim.schedule.phases:
        mine = [e for e in xs if e["args"]["block"] == ph.block and e["args"]["step"] >= 0]
        # exactly the schedule's ops: same names, same count, each on its own stream's track
        assert Counter(e["name"] for e in mine) == Counter(op.name for op in ph.ops)
        by_id = {op.id: op for op in ph.ops}
        for e in mine:
            op = by_id[e["args"]["id"]]
            assert e["name"] == op.name and tracks[e["tid"]] == op.stream
            assert e["args"] == {"id": op.id, "kind": op.kind, "layer": op.layer, "bytes": op.bytes,
                                 "step": e["args"]["step"], "block": ph.block}
    assert {tracks[e["tid"]] for e in xs} >= {"compute", "h2d"}


def test_trace_times_are_the_simulated_times(sim):
    events = [e for e in json.loads(to_json(sim))["traceEvents"] if e["ph"] == "X" and e["args"]["step"] >= 0]
    xs = [e for e in events if e["args"]["kind"] != "step"]
    walls = {e["args"]["block"]: e for e in events if e["args"]["kind"] == "step"}
    for res in sim.phases:
        mine = [e for e in xs if e["args"]["block"] == res.block]
        span = (max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)) * 1e-6
        assert span == pytest.approx(res.step_seconds, rel=1e-6)
        # the steps track holds the same span
        assert walls[res.block]["dur"] * 1e-6 == pytest.approx(res.step_seconds, rel=1e-6)
        assert walls[res.block]["ts"] == pytest.approx(min(e["ts"] for e in mine), abs=1e-3)
        first = min(mine, key=lambda e: e["ts"])
        i = first["args"]["id"]
        assert first["dur"] * 1e-6 == pytest.approx(res.finish[i] - res.start[i], abs=1e-8)
    # phases follow one another in the first cycle's order
    starts = [min(e["ts"] for e in xs if e["args"]["step"] == s) for s in range(len(sim.phases))]
    assert starts == sorted(starts)
