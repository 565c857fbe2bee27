"""simulator/whatif.py and `blockfit simulate`: a plan on other hardware, kept or planned again."""
from __future__ import annotations

import json

import pytest

from planner.hardware import GIB
from simulator.engine import simulate
from simulator.report import overflow_lines
from simulator.whatif import Overrides, keep_plan, what_if
from tools.cli import run


@pytest.fixture(scope="module")
def a100_plan(plan_file):
    """7B on an A100 80GB: everything resident, about 76 GiB at the peak."""
    return plan_file("7b", "a100-80g", seq_len=2048, batch=8)


def test_a_smaller_budget_names_the_phase_and_the_overflow(a100_plan):
    plan, _ = a100_plan
    sim = simulate(keep_plan(plan, Overrides(vram_gib=40)))
    cap = 40 * GIB - plan.reserve_bytes
    over = sim.overflows()
    assert over and all(o > 0 for _, o in over)
    worst = max(sim.phases, key=lambda p: p.peak_bytes)
    assert dict(over)[worst.block] == worst.peak_bytes - cap
    lines = overflow_lines(sim)
    b = plan.blocks[worst.block]
    line = next(x for x in lines if f"phase {worst.block} " in x)
    assert f"layers {b.first}-{b.last}" in line and f"{(worst.peak_bytes - cap) / GIB:.2f} GiB over" in line


def test_the_command_reports_the_overflow(a100_plan, capsys):
    _, path = a100_plan
    assert run(["simulate", "--plan", path, "--vram", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["overflows"]
    assert out["overflows"][0]["bytes"] > 30 * GIB   # ~76 GiB of state and weights in 38.5 usable
    assert "does not fit: phase" in out["overflow_messages"][0]
    assert run(["simulate", "--plan", path, "--vram", "40"]) == 0
    assert "does not fit: phase" in capsys.readouterr().out


def test_keeping_the_plan_on_a_faster_gpu_is_faster_and_still_fits(a100_plan):
    plan, _ = a100_plan
    before, after = what_if(plan, Overrides(gpu="h100-sxm"))
    assert after.hardware.gpu.id == "h100-sxm" and not after.overflows()
    assert after.tokens_per_s > 1.5 * before.tokens_per_s     # 989 vs 312 dense TFLOPS, compute bound
    assert after.plan.placements == plan.placements


def test_shape_overrides_keep_the_batch(a100_plan):
    plan, _ = a100_plan
    p = keep_plan(plan, Overrides(micro_batch=1, seq_len=1024))
    assert p.shape.micro_batch == 1 and p.shape.seq_len == 1024
    assert p.shape.micro_batch * p.shape.grad_accum == plan.shape.micro_batch * plan.shape.grad_accum


def test_replan_fits_where_the_kept_plan_does_not(a100_plan):
    plan, _ = a100_plan
    _, kept = what_if(plan, Overrides(gpu="rtx4090"))
    assert kept.overflows()
    from simulator.whatif import replan
    # bounded by the deterministic work limit, not the clock
    new = replan(plan, Overrides(gpu="rtx4090"), time_limit_s=120.0)
    assert new.hardware.gpu.id == "rtx4090"
    assert any(p.weights != "gpu" for p in new.placements)   # 13.5 GB of bf16 weights cannot all stay
