"""The planner's own step-time estimate and the simulator's agree within 5% on plans the ILP chooses.

The planner linearises (each layer's pass costs its busiest stream, as if every transfer overlapped its compute);
the simulator plays the same ops with their dependencies and the prefetch window. They should differ only by
pipeline fill and by smoothing across layers, a few percent. A larger gap is a finding about the schedule or the
ILP, not a tolerance to widen.
"""
from __future__ import annotations

import pytest

from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.planning import Request, make_plan
from planner.profile import profile_model
from simulator.engine import simulate

CASES = [  # (model, gpu, VRAM budget GiB, what the ILP ends up doing there)
    ("tiny", "rtx4090", None, "everything resident"),
    ("1b", "rtx4090", 8, "weights streamed, some recompute"),
    ("1b", "a100-40g", 6, "weights streamed, five blocks"),
    ("7b", "a100-80g", None, "everything resident"),
    ("7b", "rtx4090", 12, "optimizer on the CPU, weights streamed"),
    ("7b", "rtx4090", 24, "weights streamed, activations offloaded"),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2] or 'full'}")
def planned(request):
    model, gpu, vram, _ = request.param
    cfg = CATALOG[model]
    prof = profile_model(cfg)
    plan = make_plan(cfg, make_hardware(gpu=gpu), Request(vram_gib=vram, seq_len=min(2048, cfg.max_seq), batch=8,
                                                          work_limit=0.5), prof)   # deterministic
    return plan, simulate(plan, profile=prof)


def test_planner_and_simulator_agree_within_5_percent(planned):
    plan, sim = planned
    for pred, res in zip(plan.predicted.phases, sim.phases):
        assert res.block == pred.block
        err = res.step_seconds / pred.step_seconds - 1
        assert abs(err) <= 0.05, (f"phase {res.block}: planner {pred.step_seconds:.4g} s, simulator "
                                  f"{res.step_seconds:.4g} s ({err:+.1%}); {res.bottleneck}")


def test_cycle_totals_agree(planned):
    plan, sim = planned
    assert sim.cycle_seconds == pytest.approx(plan.predicted.cycle_seconds, rel=0.05)
