"""planner/memory.py: tiers as values that plan files keep as plain names, and plans whose host RAM and NVMe bytes,
counted by the memory model, stay within what the hardware offers."""
from __future__ import annotations

import json

import pytest

from planner import memory
from planner.hardware import GIB, make_hardware
from planner.memory import Tier
from planner.models import CATALOG
from planner.plan import Plan, validate
from planner.planning import Request, make_plan


def test_tiers_are_their_names():
    assert [str(t) for t in Tier] == ["gpu", "cpu", "nvme"]
    assert Tier.CPU == "cpu" and {"cpu": 1}[Tier.CPU] == 1 and json.dumps([Tier.NVME]) == '["nvme"]'
    assert Tier.NVME.to_device == ("nvme_read", "h2d") and Tier.NVME.from_device == ("d2h", "nvme_write")
    assert memory.kept_tier("keep_nvme") is Tier.NVME and memory.kept_tier("reset") is None


def test_a_tier_without_capacity_is_not_offered():
    assert memory.tiers(make_hardware(gpu="rtx4090", host_ram_gib=64)) == (Tier.GPU, Tier.CPU)
    hw = make_hardware(gpu="rtx4090", host_ram_gib=64, nvme_gib=100)
    assert memory.tiers(hw) == (Tier.GPU, Tier.CPU, Tier.NVME)
    assert memory.host_usable_bytes(hw) == int(64 * GIB * 0.85)
    assert memory.nvme_usable_bytes(hw) == int(100 * GIB * 0.95)


@pytest.fixture(scope="module")
def offloading_plan() -> Plan:
    """1B on a 4 GiB budget with 16 GiB of host RAM and an NVMe tier: weights and state must leave the device."""
    hw = make_hardware(gpu="rtx4090", vram_gib=4, host_ram_gib=16, nvme_gib=100)
    return make_plan(CATALOG["1b"], hw, Request(vram_gib=4, seq_len=512, batch=4, time_limit_s=3))


def test_plan_files_keep_plain_tier_names(offloading_plan):
    d = json.loads(offloading_plan.to_json())
    names = {v for p in d["placements"] for k, v in p.items() if k != "layer"}
    assert names <= {"gpu", "cpu", "nvme", "recompute"} and all(type(v) is str for v in names)
    back = Plan.from_dict(d)
    validate(back)
    assert back == offloading_plan


def test_planned_bytes_fit_the_usable_capacities(offloading_plan):
    """The ILP's host and NVMe constraints bound the plan's own figures (the model's, counted per class): a plan
    that it accepts never needs more than the hardware offers."""
    p, hw = offloading_plan, offloading_plan.hardware
    assert any(pl.weights != "gpu" for pl in p.placements) or any(pl.master != "gpu" for pl in p.placements)
    assert 0 < p.predicted.host_ram_bytes <= memory.host_usable_bytes(hw)
    assert p.predicted.nvme_bytes <= memory.nvme_usable_bytes(hw)
    assert p.predicted.peak_vram_bytes <= memory.plan_cap_bytes(p)
