"""simulator/compare.py and `blockfit compare`: traces and summaries, phase by phase, stream and op."""
from __future__ import annotations

import json

import pytest

from planner.fastplan import quick_plan
from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.planning import Request
from planner.profile import profile_model
from simulator.chrome_trace import trace_events
from simulator.compare import compare, load
from simulator.engine import simulate
from tools.cli import run


@pytest.fixture(scope="module")
def sim():
    cfg = CATALOG["1b"]
    prof = profile_model(cfg)
    # the fast planner's choice here: several blocks, weights streamed (a trace with several phases and tracks)
    plan = quick_plan(prof, make_hardware(gpu="rtx4090"), Request(vram_gib=5, seq_len=512, batch=4))
    assert len(plan.blocks) > 1 and any(p.weights != "gpu" for p in plan.placements)
    return simulate(plan, profile=prof)


def _scaled(events, k: float, *, runtime_layout: bool = False):
    """A 'measured' trace: every duration and start times k, optionally in the runtime's pid/tid layout."""
    out = []
    for e in events:
        e = json.loads(json.dumps(e))
        if e["ph"] == "X":
            e["ts"] *= k
            e["dur"] *= k
        if runtime_layout:
            e["pid"] = 0
            e["tid"] = e.get("tid", 1) - 1
        out.append(e)
    return out


def test_a_trace_against_itself_agrees_exactly(sim, tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": trace_events(sim)}))
    c = compare(load(str(p)), load(str(p)))
    assert len(c.phases) == len(sim.phases) and not c.unmatched
    for _, steps, m, pr, err in c.phases:
        assert steps == 1 and m == pytest.approx(pr) and err == pytest.approx(0.0)
    # phases are recognised by the first layer their backward reaches: the block's first layer
    assert {k for k, *_ in c.phases} == {f"L{b.first}" for b in sim.plan.blocks}
    want = {f"L{sim.plan.blocks[r.block].first}": r.step_seconds for r in sim.phases}
    assert {k: m for k, _, m, _, _ in c.phases} == pytest.approx(want, rel=1e-6)


def test_a_slower_measurement_shows_as_a_relative_error(sim, tmp_path):
    pred, meas = tmp_path / "pred.json", tmp_path / "meas.json"
    events = trace_events(sim)
    pred.write_text(json.dumps({"traceEvents": events}))
    meas.write_text(json.dumps(_scaled(events, 1.25, runtime_layout=True)))  # a bare list, tids from 0
    c = compare(load(str(meas)), load(str(pred)))
    for *_, err in c.phases:
        assert err == pytest.approx(1 / 1.25 - 1, abs=1e-6)
    assert c.ops and all(m == pytest.approx(1.25 * p, rel=1e-4) for _, _, m, p in c.ops if p > 1e-5)
    assert {s for _, s, _, _ in c.streams} >= {"compute", "h2d"}


def test_summaries_and_the_command(sim, tmp_path, capsys):
    s1, s2 = tmp_path / "a.json", tmp_path / "b.json"
    s1.write_text(json.dumps(sim.summary()))
    measured = dict(sim.summary(), step_seconds_by_phase={k: 2 * v for k, v in
                                                          sim.summary()["step_seconds_by_phase"].items()})
    s2.write_text(json.dumps(measured))
    assert run(["compare", str(s2), str(s1), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["phases"]) == len(sim.phases)
    assert all(p["relative_error"] == pytest.approx(-0.5) for p in out["phases"])
    assert out["peaks"] and all(p["measured_bytes"] == p["predicted_bytes"] for p in out["peaks"])
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"traceEvents": trace_events(sim)}))
    assert run(["compare", str(t), str(s1)]) == 2
    assert "two traces or two summaries" in capsys.readouterr().err
    assert run(["compare", str(t), str(t)]) == 0
    assert "Per phase" in capsys.readouterr().out


def test_step_time_comes_from_the_steps_track(sim, tmp_path):
    """An op of a step issued early, inside the step before (the runtime's early NVMe reads), widens the ops'
    extent but not the step: the steps track's span is the step time. Without the track, the extent is used."""
    events = trace_events(sim)
    moved = json.loads(json.dumps(events))
    first_op = min((e for e in moved if e["ph"] == "X" and e["args"].get("kind") != "step"
                    and e["args"]["step"] == 1), key=lambda e: e["ts"])
    first_op["ts"] -= 50_000.0   # 50 ms earlier
    p, q = tmp_path / "moved.json", tmp_path / "no-steps.json"
    p.write_text(json.dumps({"traceEvents": moved}))
    q.write_text(json.dumps({"traceEvents": [e for e in moved if (e.get("args") or {}).get("kind") != "step"]}))
    key = f"L{sim.plan.blocks[sim.plan.block_order(0)[1]].first}"
    want = next(r.step_seconds for r in sim.phases if r.block == sim.plan.block_order(0)[1])
    assert load(str(p)).phases[key] == pytest.approx(want, rel=1e-6)
    assert load(str(q)).phases[key] == pytest.approx(want + 0.05, rel=1e-6)
