"""`blockfit calibrate --quick` on this machine writes a profile that the planner and the simulator read."""
from __future__ import annotations

import json

from planner.hardware import load_hardware_file
from simulator.calibrate import fit_matmul
from tools.cli import run


def test_quick_calibration_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "hw.json"
    assert run(["calibrate", "--quick", "--model", "tiny", "--dir", str(tmp_path), "--out", str(out)]) == 0
    hw = load_hardware_file(str(out))
    assert hw.calibrated
    g, h, e = hw.gpu, hw.host, hw.eff
    for v in (g.vram_gib, g.memory_gbps, g.bf16_tflops, g.h2d_gbps, g.d2h_gbps, h.ram_gib, h.nvme_read_gbps,
              h.nvme_write_gbps, h.cpu_adam_params_per_s, e.matmul_max, e.memory, e.link):
        assert v > 0
    assert e.matmul_half_tokens >= 0 and 0 < h.pageable_factor <= 1
    assert h.nvme_gib > 0   # --dir given: its free space is offered to plans
    raw = json.loads(out.read_text())
    m = raw["measurements"]
    assert m["nvme"]["method"] in ("O_DIRECT", "fsync + posix_fadvise(DONTNEED)")
    assert len(m["matmul_tflops"]) >= 4 and set(m["links_gbps"]) == {"h2d", "d2h"}
    assert "profile written" in capsys.readouterr().out


def test_a_calibrated_profile_drives_plan_and_simulate(tmp_path):
    out = tmp_path / "hw.json"
    assert run(["calibrate", "--quick", "--model", "tiny", "--out", str(out), "--quiet"]) == 0
    from planner.models import CATALOG
    from planner.planning import Request, make_plan
    from planner.profile import profile_model
    from simulator.engine import simulate
    hw = load_hardware_file(str(out))
    plan = make_plan(CATALOG["tiny"], hw, Request(vram_gib=1.0, reserve_gib=0.1, seq_len=128, batch=2,
                                                   time_limit_s=1.0), profile_model(CATALOG["tiny"]))
    sim = simulate(plan)
    assert sim.hardware.calibrated and sim.cycle_seconds > 0


def test_matmul_fit_recovers_the_curve():
    a, half = 100.0, 300.0
    pts = [(t, a * t / (t + half)) for t in (16, 64, 256, 1024, 4096)]
    got_a, got_half = fit_matmul(pts)
    assert abs(got_a - a) < 1e-6 * a and abs(got_half - half) < 1e-6 * half
