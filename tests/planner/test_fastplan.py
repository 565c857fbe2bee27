"""planner/fastplan.py: the sweeps' enumeration planner optimises the same objective as the ILP."""
from __future__ import annotations

import pytest

from planner.fastplan import quick_plan
from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.planning import Request
from planner.profile import profile_model


@pytest.mark.parametrize("gpu,vram", [("rtx4090", 24), ("a100-80g", None)])
def test_default_is_the_best_block_count_for_tokens_per_s(gpu, vram):
    """Its default plan is at least as fast per token as its plan for every fixed block count, and faster than
    its shortest-cycle plan whenever that one differs."""
    prof = profile_model(CATALOG["7b"])
    hw = make_hardware(gpu=gpu)
    req = Request(vram_gib=vram, seq_len=2048, batch=8)
    cache: dict = {}
    best = quick_plan(prof, hw, req, cache=cache)
    rates = [p.predicted.tokens_per_s for n in range(1, prof.n_decoder + 1)
             if (p := quick_plan(prof, hw, req, cache=cache, blocks=n)) is not None]
    assert best.predicted.tokens_per_s >= max(rates) * (1 - 1e-9)
    cycle = quick_plan(prof, hw, Request(vram_gib=vram, seq_len=2048, batch=8, objective="cycle"), cache=cache)
    assert len(best.blocks) > len(cycle.blocks)
    assert best.predicted.tokens_per_s > 1.2 * cycle.predicted.tokens_per_s
    # its report is in the objective's units: seconds per token
    assert best.solver.objective_kind == "tokens"
    assert best.solver.objective == pytest.approx(1 / best.predicted.tokens_per_s)


def test_blocks_are_contiguous_and_bottom_heavy():
    prof = profile_model(CATALOG["7b"])
    plan = quick_plan(prof, make_hardware(gpu="a100-80g"), Request(seq_len=2048, batch=8))
    sizes = [b.last - b.first + 1 for b in plan.blocks]
    assert plan.blocks[0].first == 1 and plan.blocks[-1].last == prof.n_decoder
    assert all(a.last + 1 == b.first for a, b in zip(plan.blocks, plan.blocks[1:]))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == max(sizes)
