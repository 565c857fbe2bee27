"""make_plan's tighten-and-resolve path: when the schedule's replay finds more device bytes than the ILP counted,
the planner lowers the ILP's cap and solves again, and the plan it returns fits the budget by the replay.

The ILP's transient reserve is an estimate; here it is halved (monkeypatched) so that the ILP undercounts, as a
linearisation error would, on a budget small enough for that to matter. The replay (build_schedule +
memory_timeline, the same replay the runtime's ledger is checked against) is the reference for what fits."""
from __future__ import annotations

from planner import ilp, planning
from planner.errors import UserError
from planner.hardware import GIB, make_hardware
from planner.models import CATALOG
from planner.profile import profile_model
from planner.schedule import build_schedule, memory_timeline

RESERVE_GIB = 1e-4


def test_an_undercounting_ilp_is_tightened_until_the_replay_fits(monkeypatch):
    cfg = CATALOG["tiny"]
    prof = profile_model(cfg)
    real_transient = ilp.transient_bytes
    monkeypatch.setattr(ilp, "transient_bytes", lambda sizes, tier: real_transient(sizes, tier) // 2)
    caps: list[int] = []
    real_search = planning.search

    def search(prof_, hw_, req_, cap):
        caps.append(cap)
        return real_search(prof_, hw_, req_, cap)
    monkeypatch.setattr(planning, "search", search)

    tightened = []
    for k in range(21):   # tiny at sequence 64 needs ~4-5 MiB: budgets from 4.0 to 6.0 thousandths of a GiB
        vram = 0.004 + 0.0001 * k
        caps.clear()
        req = planning.Request(vram_gib=vram, reserve_gib=RESERVE_GIB, seq_len=64, batch=4, micro_batch=2,
                               time_limit_s=2, objective="cycle")   # the scan was found under this objective
        try:
            plan = planning.make_plan(cfg, make_hardware(gpu="rtx4090", vram_gib=vram), req, prof)
        except UserError:
            continue   # too small even after tightening: refusing is allowed, a plan that overflows is not
        cap = int(vram * GIB) - int(RESERVE_GIB * GIB)
        peaks = [memory_timeline(ph)[0] for ph in build_schedule(plan, prof).phases]
        assert max(peaks) <= cap, (vram, max(peaks), cap, caps)
        if len(caps) > 1:
            assert caps[0] == cap and all(b < a for a, b in zip(caps, caps[1:]))
            tightened.append(vram)
    assert tightened, "no budget in the scan made the undercounting ILP overflow: the test lost its case"


def test_the_real_ilp_plans_fit_without_a_monkeypatch():
    """Same scan, the ILP as shipped: whatever make_plan returns fits by the replay."""
    cfg = CATALOG["tiny"]
    prof = profile_model(cfg)
    fitted = 0
    for k in range(0, 21, 4):
        vram = 0.004 + 0.0001 * k
        req = planning.Request(vram_gib=vram, reserve_gib=RESERVE_GIB, seq_len=64, batch=4, micro_batch=2,
                               time_limit_s=2, objective="cycle")   # the scan was found under this objective
        try:
            plan = planning.make_plan(cfg, make_hardware(gpu="rtx4090", vram_gib=vram), req, prof)
        except UserError:
            continue
        cap = int(vram * GIB) - int(RESERVE_GIB * GIB)
        assert max(memory_timeline(ph)[0] for ph in build_schedule(plan, prof).phases) <= cap
        fitted += 1
    assert fitted >= 3
