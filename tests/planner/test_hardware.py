"""How the cost model prices a device-tier AdamW step: the calibrated rate when a profile has one, else the
runtime's memory traffic at the device's bandwidth (figures from the RTX 4090 catalog entry, by hand)."""
from __future__ import annotations

import dataclasses

import pytest

from planner.hardware import make_hardware


def test_device_adam_is_priced_by_its_calibrated_rate_or_else_as_traffic():
    hw = make_hardware(gpu="rtx4090")
    params = 1e8
    # 88 bytes a parameter (runtime.optim's passes, tests/runtime/test_optim_traffic.py) over the achieved bandwidth
    traffic = params * 88 / (hw.gpu.memory_gbps * 1e9 * hw.eff.memory)
    assert hw.adam_seconds(params, "gpu") == pytest.approx(traffic, rel=1e-12)
    measured = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, adam_params_per_s=2.5e9))
    assert measured.adam_seconds(params, "gpu") == pytest.approx(0.04, rel=1e-12)
    # the host tier keeps its own rate either way
    assert measured.adam_seconds(params, "cpu") == hw.adam_seconds(params, "cpu") == pytest.approx(
        params / hw.host.cpu_adam_params_per_s, rel=1e-12)
