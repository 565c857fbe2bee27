"""Chaos mode: the CPU stand-in reorders like CUDA streams can, so a missing dependency or a skipped wait fails here.

Without CUDA every Done resolves when its work is finished and the copies are tiny, so a copy that nothing waits
for usually finishes in time anyway: a dropped dependency passes by luck. BLOCKFIT_CHAOS=seed:max_ms delays the
start and the completion of every op by a seeded random amount. The correct schedule must still equal the plain
PyTorch loop bitwise under it; a schedule missing one dependency, or an executor that skips one wait, must not.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import pytest
import torch

from runtime import engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import CASES, TC, P, reference_bcd, tiny_plan, train, write_tokens  # noqa: E402

STEPS = 6          # every block of the case's three trained twice
CHAOS = "7:4"      # seed 7, up to 4 ms before and after every op
CPU_STATE = dict(placements=[P(i, "gpu", "cpu", "gpu") for i in range(6)])


def _run(tmp_path, monkeypatch, case="tiers-ascending-reset"):
    plan = tiny_plan(**(CASES[case] if isinstance(case, str) else case))
    data = write_tokens(tmp_path / "tokens.bin")
    tc = dataclasses.replace(TC, steps=STEPS, nvme_dir=str(tmp_path / "nvme"))
    monkeypatch.setenv("BLOCKFIT_CHAOS", CHAOS)
    try:
        losses, init, final, _ = train(plan, data, tc)
    finally:
        monkeypatch.delenv("BLOCKFIT_CHAOS")
    ref_losses, ref_final = reference_bcd(plan, init, data, tc, STEPS)
    same = losses == ref_losses and all(torch.equal(final[k], ref_final[k]) for k in ref_final)
    return same


def test_chaos_delays_are_seeded_and_bounded():
    ex = engine.Executor(None, None, chaos="3:5")
    assert ex.chaos == (3, 0.005)
    op = type("Op", (), {"id": 11})()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        ex._delay(op, "start")
        times.append(time.perf_counter() - t0)
    assert all(t < 0.005 + 0.05 for t in times)
    assert engine.Executor(None, None, chaos="").chaos is None


@pytest.mark.parametrize("case", ["tiers-ascending-reset", "descending-keep_cpu", "cpu-state"])
def test_the_correct_schedule_under_chaos_equals_the_reference_bitwise(tmp_path, monkeypatch, case):
    assert _run(tmp_path, monkeypatch, CPU_STATE if case == "cpu-state" else case)


def test_chaos_catches_a_dependency_missing_from_the_schedule(tmp_path, monkeypatch):
    """The upload of a device-resident layer's new weights (CPU optimizer) loses its wait for the step."""
    import runtime.trainer as trainer
    real = trainer.build_schedule
    dropped = []

    def without_upload_dep(plan, prof, **kw):
        s = real(plan, prof, **kw)
        phases = []
        for ph in s.phases:
            ops = tuple(dataclasses.replace(op, deps=()) if op.kind == "upload_weights" else op for op in ph.ops)
            dropped.extend(op.name for op in ph.ops if op.kind == "upload_weights")
            phases.append(dataclasses.replace(ph, ops=ops))
        return dataclasses.replace(s, phases=tuple(phases))
    monkeypatch.setattr(trainer, "build_schedule", without_upload_dep)
    assert _fails(lambda: _run(tmp_path, monkeypatch))
    assert dropped  # the case really has an upload to lose


def test_chaos_catches_an_executor_that_skips_a_wait(tmp_path, monkeypatch):
    """The CPU optimizer step stops waiting for its dependencies (the gradients' copies to the host): as a CUDA
    stream that skips wait_event would. With every layer's state on the CPU, each block's first step is the first
    op on the cpu_opt stream, so nothing else orders it after its gradients: one race in every training step."""
    real = engine.Executor._call
    skipped = []

    def call(self, op, deps, handler, ctx=None):
        if op.kind == "optimizer_step" and op.tier == "cpu":
            skipped.append(op.name)
            deps = []
        return real(self, op, deps, handler, ctx)
    monkeypatch.setattr(engine.Executor, "_call", call)
    assert _fails(lambda: _run(tmp_path, monkeypatch, CPU_STATE))
    assert skipped


def _fails(run) -> bool:
    """The run trips an error or its numbers differ from the reference."""
    try:
        return not run()
    except (KeyError, AttributeError, RuntimeError, AssertionError) as e:  # an input missing or the wrong size
        print("tripped:", type(e).__name__, e)
        return True
