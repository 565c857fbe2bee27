"""NVMe wear (planner/wear.py): bytes written per step and per day, counted from placements by hand here; the TBW
warning; the planner's cap on writes per day."""
from __future__ import annotations

import json
import os
import sys

import pytest

from planner.wear import WARRANTY_DAYS, days_to_wear_out, wear_warning
from tools.cli import run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime"))
from test_equivalence import CASES, tiny_plan  # noqa: E402


def _by_hand(plan) -> tuple[float, float]:
    """(bytes per step, bytes per day) from the placements: after each step of block k, every layer of k whose
    optimizer state is on NVMe writes its fp32 master and two moments (12 bytes a parameter), and every layer of k
    whose bf16 weights are on NVMe writes them back (2 bytes a parameter); under keep_nvme a switch saves the state
    of the block's layers whose state lives elsewhere while it trains."""
    params = [lp.params for lp in _profile(plan).layers]
    held = [lp.param_bytes for lp in _profile(plan).layers]
    cycle = 0
    for b in plan.blocks:
        step = sum(12 * params[i] * (plan.placement(i).master == "nvme")
                   + held[i] * (plan.placement(i).weights == "nvme") for i in b.layers)
        cycle += plan.steps_per_block * step
        if plan.switch_state == "keep_nvme" and len(plan.blocks) > 1:
            cycle += sum(12 * params[i] for i in b.layers if plan.placement(i).master != "nvme")
    steps = plan.steps_per_block * len(plan.blocks)
    return cycle / steps, cycle / plan.predicted.cycle_seconds * 86400


def _profile(plan):
    from planner.profile import profile_model
    return profile_model(plan.model)


@pytest.mark.parametrize("case", ["tiers-ascending-reset", "descending-keep_cpu", "random-keep_nvme"])
def test_writes_per_step_and_day_equal_a_count_by_hand(case):
    plan = tiny_plan(**CASES[case])
    per_step, per_day = _by_hand(plan)
    assert per_step > 0
    assert plan.predicted.nvme_write_bytes_per_step == int(per_step)
    assert plan.predicted.nvme_write_bytes_per_day == pytest.approx(per_day, rel=1e-12)


def test_a_plan_without_nvme_writes_nothing():
    plan = tiny_plan()  # everything on the device
    assert plan.predicted.nvme_write_bytes_per_step == 0 and plan.predicted.nvme_write_bytes_per_day == 0


def test_tbw_warning_states_days_to_wear_out():
    # the 70B figure: 132 TB a day on a 1,200 TBW drive wears it out in about 9 days
    assert days_to_wear_out(132e12, 1200) == pytest.approx(1200 / 132)
    w = wear_warning(132e12, 1200)
    assert w and "132.0 TB a day" in w and "about 9 days" in w and "--nvme-tbw" in w
    # a day's share over a five-year warranty is allowed; a little more warns
    share = 1200e12 / WARRANTY_DAYS
    assert wear_warning(share, 1200) is None and wear_warning(share * 1.01, 1200) is not None


PLAN = ["plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--reserve", "1MiB", "--vram", "3MiB",
        "--nvme", "10MiB", "--objective", "cycle", "--json"]  # scenarios found under the shortest-cycle objective


def _plan(capsys, *args):
    code = run([*PLAN, *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_the_plan_respects_a_cap_on_writes_per_day(capsys):
    """With 3 MiB of host RAM the plan the planner prefers keeps optimizer state on NVMe; under a cap below its
    writes it takes a plan that writes less (here none: a finer partition keeps the state in host RAM)."""
    code, free, _ = _plan(capsys, "--host-ram", "3MiB")
    assert code == 0
    writes = free["predicted"]["nvme_write_bytes_per_day"]
    assert writes > 0
    code, capped, _ = _plan(capsys, "--host-ram", "3MiB", "--max-nvme-writes-per-day", f"{int(writes / 2)}B")
    assert code == 0
    assert capped["predicted"]["nvme_write_bytes_per_day"] <= writes / 2
    assert capped["hardware"]["host"]["nvme_gib"] == free["hardware"]["host"]["nvme_gib"]  # the machine as given
    code, loose, _ = _plan(capsys, "--host-ram", "3MiB", "--max-nvme-writes-per-day", f"{int(writes) + 1}B")
    assert code == 0 and loose["predicted"] == free["predicted"]  # a cap above the writes changes nothing


def test_a_cap_nothing_can_meet_is_refused_naming_it(capsys):
    # keep_nvme saves each block's state to NVMe at its switch: no plan without the drive exists
    code, free, _ = _plan(capsys, "--host-ram", "3MiB", "--switch-state", "keep_nvme", "--blocks", "2")
    assert code == 0 and free["predicted"]["nvme_write_bytes_per_day"] > 0
    code, _, err = _plan(capsys, "--host-ram", "3MiB", "--switch-state", "keep_nvme", "--blocks", "2",
                         "--max-nvme-writes-per-day", "1MB")
    assert code == 2 and "--max-nvme-writes-per-day" in err and "TB a day" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, bad", [("--max-nvme-writes-per-day", "nan"), ("--max-nvme-writes-per-day", "-1TB"),
                                       ("--nvme-tbw", "nan"), ("--nvme-tbw", "0"), ("--nvme-tbw", "-5")])
def test_bad_wear_flags_exit_2(capsys, flag, bad):
    code, _, err = _plan(capsys, "--host-ram", "3MiB", f"{flag}={bad}")
    assert code == 2 and flag in err


def test_plan_view_shows_writes_and_warns(capsys):
    code = run([*PLAN[:-1], "--host-ram", "3MiB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "NVMe writes:" in out and "GB per optimizer step" in out and "TB per day" in out
    assert "warning:" in out and "wears out in about" in out
