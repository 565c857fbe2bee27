"""`blockfit calibrate` measures the runtime's own primitives and writes a profile the planner and simulator read.

The facts checked: the profile's rates are the runtime path's measurements with the stand-in's byte scale
(2 / 4: fp32 weights on the CPU against the schedule's bf16 bytes) applied, as computed here from the raw
figures; the NVMe reader, the AdamW and the copy path timed are the runtime's (counted by wrapping them); NVMe
reads of a layer-sized file are split into the runtime's parallel requests.
"""
from __future__ import annotations

import json

import pytest

import runtime.hostio
import runtime.optim
from planner.hardware import load_hardware_file
from runtime.calibrate import fit_matmul, measure_adam, measure_nvme
from runtime.hostio import HostMemory, NvmeFiles
from runtime.store import Target
from tools.cli import run


def _counting(monkeypatch, owner, name, calls: list):
    real = getattr(owner, name)

    def wrapper(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, wrapper)


def test_quick_calibration_writes_a_loadable_profile_from_the_runtime_path(tmp_path, capsys, monkeypatch):
    reads, writes, steps, host = [], [], [], []
    _counting(monkeypatch, NvmeFiles, "read", reads)
    _counting(monkeypatch, NvmeFiles, "write", writes)
    _counting(monkeypatch, runtime.optim, "adamw_", steps)
    _counting(monkeypatch, HostMemory, "empty", host)
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
    import torch
    assert g.shared_cores == torch.get_num_threads() >= 1   # the CPU's copies and compute share its threads
    m = json.loads(out.read_text())["measurements"]
    # the runtime's primitives did the work: its NVMe writer and reader, its AdamW, its registered host memory
    nv = m["nvme"]
    assert len(writes) == len(reads) == 2 * nv["files"] and nv["files"] >= 2   # two passes each
    assert nv["bytes"] == nv["files"] * nv["file_bytes"]
    assert len(steps) >= 2 and len(host) >= 3
    assert nv["method"].startswith("O_DIRECT, 4 requests") or nv["method"].startswith("posix_fadvise")
    # the CPU stand-in: fp32 bytes in the runtime, bf16 bytes in the schedule -> rates x 2/4
    scale = 2 / 4
    assert m["schedule_bytes_scale"] == scale
    big = str(max(int(s) for s in m["links_gbps"]["h2d"]["registered"]))
    assert g.h2d_gbps == pytest.approx(m["links_gbps"]["h2d"]["registered"][big] * scale, rel=1e-12)
    assert g.d2h_gbps == pytest.approx(m["links_gbps"]["d2h"]["registered"][big] * scale, rel=1e-12)
    assert h.nvme_read_gbps == pytest.approx(nv["read_gbps"] * scale, rel=1e-12)
    assert h.nvme_write_gbps == pytest.approx(nv["write_gbps"] * scale, rel=1e-12)
    assert h.cpu_adam_params_per_s == m["cpu_adam"]["params_per_s"]
    # the device-tier step is timed too (both tiers through the runtime's adamw_: two timed calls or more each)
    assert g.adam_params_per_s == m["device_adam"]["params_per_s"] > 0 and len(steps) >= 4
    assert "device tier" in m["device_adam"]["what"] and "host tier" in m["cpu_adam"]["what"]
    pageable = m["links_gbps"]["h2d"]["pageable"][big] / m["links_gbps"]["h2d"]["registered"][big]
    assert h.pageable_factor == pytest.approx(min(1.0, pageable), rel=1e-12)
    assert len(m["matmul_tflops"]) >= 4 and set(m["links_gbps"]) == {"h2d", "d2h"}
    assert set(m["links_gbps"]["h2d"]) == {"registered", "pinned", "pageable"}
    assert "profile written" in capsys.readouterr().out


def test_a_cpu_collective_is_priced_per_schedule_byte():
    """The CPU runtime reduces fp32 gradients, twice the bf16 bytes the schedule's reduce ops count: the link the
    planner gets from a gloo measurement on one node is the bus bandwidth x 2/4 (the largest size's), as the
    copy rates are, and so is the wire bytes per CPU second the simulator takes from compute; across nodes both
    are only recorded."""
    from runtime.calibrate import calibrate
    bus = {str(1 << 20): 0.9, str(16 << 20): 1.6}
    one_node = {"backend": "gloo", "world": 2, "local_world": 2, "bus_gbps": bus,
                "cpu_gbps": {str(1 << 20): 0.7, str(16 << 20): 1.2}}
    hw, m = calibrate(quick=True, model="tiny", device="cpu", collective=one_node)
    assert hw.host.collective_gbps == pytest.approx(1.6 * 2 / 4, rel=1e-12)
    assert hw.gpu.collective_cpu_gbps == pytest.approx(1.2 * 2 / 4, rel=1e-12)
    assert m["collective"] == one_node
    hw2, _ = calibrate(quick=True, model="tiny", device="cpu", collective={**one_node, "local_world": 1})
    assert hw2.host.collective_gbps == 0.0 and hw2.gpu.collective_cpu_gbps == 0.0


def test_nvme_reads_go_through_the_runtimes_parallel_requests(tmp_path, monkeypatch):
    parts = []
    _counting(monkeypatch, runtime.hostio, "_pread", parts)
    nv = measure_nvme(str(tmp_path), 32 << 20, 8 << 20, Target.detect(force_cpu=True), repeats=1)
    assert nv["file_bytes"] == 8 << 20 and nv["files"] == 4 and nv["bytes"] == 32 << 20
    if nv["method"].startswith("O_DIRECT"):
        # 8 MiB over 4 requests: 2 MiB each, so 4 preads per file
        spans = sorted((a[2], a[3]) for a, _ in parts)
        assert spans == sorted([(k << 21, (k + 1) << 21) for k in range(4)] * 4)
    assert list(tmp_path.iterdir()) == []   # the runtime's NvmeFiles removed its directory


def test_adam_rate_is_the_runtimes_whole_layer_step(monkeypatch):
    calls = []
    _counting(monkeypatch, runtime.optim, "adamw_", calls)
    got = measure_adam(1 << 16, 2, Target.detect(force_cpu=True))
    assert got["params"] == 1 << 16 and got["params_per_s"] > 0
    # one vectorised call per step over the layer's three tensors, 65536 parameters in all
    assert len(calls) >= 2
    for (params, grads, *_), _kw in calls:
        assert [p.numel() for p in params] == [1 << 15, 1 << 14, 1 << 14] and len(grads) == 3


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


# -- known injected speeds: the timed work replaced by sleeps of known length, so each rate must be bytes (or
# parameters) over the injected seconds, within the slack of the sleeps themselves

SLOW = 0.05          # seconds per injected request
SLACK = 0.7          # measured rate >= 70% of the injected one (sleep overshoot, the machine's other work)


def test_timing_takes_the_median_of_repeats_of_known_durations():
    """After a slow warm-up call, five calls sleep 20, 80, 40, 100 and 30 ms: the median is 40 ms, where the best
    would be 20 and the mean 54."""
    import time

    from runtime.calibrate import _time
    sleeps = [0.09, 0.02, 0.08, 0.04, 0.10, 0.03]
    calls = []

    def fn():
        time.sleep(sleeps[len(calls)])
        calls.append(None)
    typical = _time(fn, False, repeats=5)
    assert 0.04 <= typical < 0.054 and len(calls) == 6


def test_nvme_rates_are_bytes_over_the_drive_time_with_requests_in_flight(tmp_path, monkeypatch):
    """Every pwrite and preadv sleeps `slow`. A file is one pwrite; its O_DIRECT read is 4 preadv of 1 MiB in
    flight at once, so a file reads in about `slow`, not 4 x `slow` (one request at a time would fail the lower
    bound). `slow` is long against the real copy of 4 MiB into the page cache that each write still makes."""
    import os
    import time
    pwrite, preadv = os.pwrite, os.preadv
    slow = 0.2

    def slow_pwrite(fd, data, offset):
        time.sleep(slow)
        return pwrite(fd, data, offset)

    def slow_preadv(fd, bufs, offset):
        time.sleep(slow)
        return preadv(fd, bufs, offset)
    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    monkeypatch.setattr(os, "preadv", slow_preadv)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    file_bytes = 4 << 20
    got = measure_nvme(str(tmp_path), 4 * file_bytes, file_bytes, Target.detect(force_cpu=True), repeats=1)
    rate = file_bytes / slow / 1e9             # GB/s: one file per injected request time
    assert got["files"] == 4 and got["bytes"] == 4 * file_bytes
    assert SLACK * rate <= got["write_gbps"] <= rate
    if got["method"].startswith("O_DIRECT"):
        assert SLACK * rate <= got["read_gbps"] <= 4 * rate / 3.5   # parallel: about one SLOW per file
    else:
        assert SLACK * rate <= got["read_gbps"] <= rate             # one read per file


def test_cpu_adam_rate_is_params_over_the_step_time(monkeypatch):
    import time

    def fake_adamw(params, *a, **kw):
        time.sleep(SLOW)
        return 0
    monkeypatch.setattr(runtime.optim, "adamw_", fake_adamw)
    params = 1 << 12
    got = measure_adam(params, 2, Target.detect(force_cpu=True))
    assert SLACK * params / SLOW <= got["params_per_s"] <= params / SLOW


def test_link_rates_are_bytes_over_the_copy_time(monkeypatch):
    import runtime.calibrate as cal
    real = cal._time
    monkeypatch.setattr(cal, "_time", lambda fn, cuda, repeats: (real(fn, cuda, 1), SLOW)[1])
    n = 1 << 20
    got = cal.measure_links(Target.detect(force_cpu=True), [n], repeats=1)
    for direction in ("h2d", "d2h"):
        for kind in ("registered", "pinned", "pageable"):
            assert got[direction][kind][n] == pytest.approx(n / SLOW / 1e9, rel=1e-12)
