"""Calibration against known injected speeds: a fake drive, a fake optimizer and a fake kernel of known duration.

`test_calibrate.py` checks that a real calibration writes a loadable profile (its figures only > 0: this machine's
speeds are unknown). Here the timed work is replaced by sleeps of known length, so the figures calibration reports
must be bytes (or parameters) / the injected seconds, within the slack of the sleeps themselves."""
from __future__ import annotations

import os
import time

import pytest

from simulator import calibrate

SLOW = 0.05          # seconds per injected request
SLACK = 0.7          # measured rate >= 70% of the injected one (sleep overshoot, the machine's other work)


def test_timing_takes_the_best_of_repeats_of_a_known_duration():
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.03 if len(calls) > 2 else 0.06)   # the first (warm-up) and second calls are slower
    best = calibrate._time(fn, "cpu", repeats=4)
    assert 0.03 <= best < 0.03 / SLACK and len(calls) == 5


def test_nvme_rates_are_bytes_over_the_drive_time(tmp_path, monkeypatch):
    block = 1 << 20
    nbytes = 4 * block
    write, readv = os.write, os.readv

    def slow_write(fd, data):
        time.sleep(SLOW)
        return write(fd, data)

    def slow_readv(fd, bufs):
        time.sleep(SLOW)
        return readv(fd, bufs)
    monkeypatch.setattr(os, "write", slow_write)
    monkeypatch.setattr(os, "readv", slow_readv)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    got = calibrate.measure_nvme(str(tmp_path), nbytes, block=block)
    rate = block / SLOW / 1e9             # GB/s: one block per injected request
    assert got["bytes"] == nbytes
    assert SLACK * rate <= got["write_gbps"] <= rate
    # reads: four blocks, then one more request that finds the end of the file
    assert SLACK * rate * 4 / 5 <= got["read_gbps"] <= rate
    assert os.listdir(tmp_path) == []     # the probe file is gone


def test_cpu_adam_rate_is_params_over_the_step_time(monkeypatch):
    import torch

    class FakeAdamW:
        def __init__(self, params, **kw):
            pass

        def step(self):
            time.sleep(SLOW)
    monkeypatch.setattr(torch.optim, "AdamW", FakeAdamW)
    params = 1 << 12
    got = calibrate.measure_adam(params, repeats=2)
    assert set(got) == {"single", "foreach", "fused"}
    for rate in got.values():
        assert SLACK * params / SLOW <= rate <= params / SLOW


@pytest.mark.parametrize("n", [1 << 20])
def test_link_rates_are_bytes_over_the_copy_time(monkeypatch, n):
    real = calibrate._time
    monkeypatch.setattr(calibrate, "_time", lambda fn, dev, repeats: (real(fn, dev, 1), SLOW)[1])
    got = calibrate.measure_links("cpu", [n], repeats=1)
    for direction in ("h2d", "d2h"):
        for kind in ("pinned", "pageable"):
            assert got[direction][kind][n] == pytest.approx(n / SLOW / 1e9, rel=1e-12)
