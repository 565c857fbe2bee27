"""simulator/periodic.py: three micro-batches extended to g give exactly what playing all g gives."""
from __future__ import annotations

import dataclasses

import pytest

from planner.fastplan import quick_plan
from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.planning import Request
from planner.profile import profile_model
from simulator.engine import simulate
from simulator.periodic import simulate_repeating

CASES = [  # (model, gpu, budget GiB, batch): streamed weights, offloads, CPU optimizer, resident
    ("1b", "rtx4090", 6, 16),
    ("7b", "rtx4090", 24, 16),
    ("7b", "rtx3090", 12, 16),
    ("7b", "a100-80g", 80, 16),
    ("13b", "l40s", 20, 8),
]


@pytest.mark.parametrize("model,gpu,vram,batch", CASES)
def test_extended_equals_played(model, gpu, vram, batch):
    prof = profile_model(CATALOG[model])
    plan = quick_plan(prof, make_hardware(gpu=gpu), Request(vram_gib=vram, seq_len=2048, batch=batch))
    if plan.shape.grad_accum < 5:   # make the shortcut do some work
        plan = dataclasses.replace(plan, shape=dataclasses.replace(plan.shape, grad_accum=6))
    full = simulate(plan, profile=prof, keep_timeline=False)
    fast = simulate_repeating(plan, profile=prof)
    assert max(len(p.ops) for p in fast.schedule.phases) < max(len(p.ops) for p in full.schedule.phases)
    for a, b in zip(full.phases, fast.phases):
        assert b.step_seconds == pytest.approx(a.step_seconds, rel=1e-9)
        assert b.peak_bytes == a.peak_bytes
        for s in a.busy_seconds:
            assert b.busy_seconds[s] == pytest.approx(a.busy_seconds[s], rel=1e-9, abs=1e-12)
        # the critical path's length is exact; its split among streams is estimated (ties go either way)
        assert sum(a.critical_seconds.values()) == pytest.approx(a.step_seconds, rel=1e-9)
        assert sum(b.critical_seconds.values()) == pytest.approx(a.step_seconds, rel=1e-9)
        assert b.bottleneck.split(" busy")[0] == a.bottleneck.split(" busy")[0]
    assert fast.tokens_per_s == pytest.approx(full.tokens_per_s, rel=1e-9)


def test_few_micro_batches_are_played_in_full():
    prof = profile_model(CATALOG["tiny"])
    plan = quick_plan(prof, make_hardware(gpu="rtx4090"), Request(seq_len=256, batch=2))
    assert plan.shape.grad_accum <= 3
    assert simulate_repeating(plan, profile=prof).phases[0].start   # played in full: per-op times kept
