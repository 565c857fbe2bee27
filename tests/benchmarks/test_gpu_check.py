"""benchmarks/gpu_check.py --dry-run runs to completion on the CPU and reports what it claims to.

A small config (2 decoder layers, hidden 256, sequence 32) keeps it to seconds on a quiet machine. Facts checked
beyond "it ran": every plan and phase is in the JSON and the table; the three plans, which differ only in where
tensors live, train to the same losses bitwise (the CPU runtime's arithmetic does not depend on placement);
the runtime's device ledger stays within each phase's predicted peak; only the streamed plan loads weights over
h2d; the NVMe-state plan reads and writes as much state as 2 layers' fp32 master and moments per step.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_completes_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = _gpu_check().main(["--dry-run", "--skip-tests", "--layers", "2", "--seq", "32", "--batch", "2",
                              "--steps-per-block", "2", "--out", str(out), "--keep", str(tmp_path / "work")])
    assert code == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert [r["plan"] for r in rep["plans"]] == ["resident", "streamed", "nvme_state"]
    for r in rep["plans"]:
        assert [ph["block"] for ph in r["phases"]] == [0, 1]
        for ph in r["phases"]:
            assert ph["measured_s"] > 0 and ph["predicted_s"] > 0 and math.isfinite(ph["error"])
            assert 0 < ph["ledger_peak_bytes"] <= ph["plan_peak_bytes"]
            assert ph["max_memory_allocated_bytes"] is None   # no CUDA in a dry run
            assert f"{ph['measured_s']:.4f}" in printed
        assert r["overlap_measured"] > 0 and r["overlap_simulated"] >= 1.0
    losses = [r["losses"] for r in rep["plans"]]
    assert len(losses[0]) == 4 and losses[0] == losses[1] == losses[2]
    by_plan = {r["plan"]: r for r in rep["plans"]}
    assert by_plan["resident"]["h2d_gbps"] is None and by_plan["streamed"]["h2d_gbps"] > 0
    # hidden 256, ffn 688: a decoder layer has 4 * 256^2 + 3 * 256 * 688 + 2 * 256 parameters; one block of one
    # layer per phase, its fp32 master and moments (12 bytes a parameter) read and written once a step
    params = 4 * 256 ** 2 + 3 * 256 * 688 + 2 * 256
    links = by_plan["nvme_state"]["bytes_by_link"]
    assert links["nvme_read"] == links["nvme_write"] == 4 * 12 * params
    assert "worst |step-time error|" in printed and rep["gpu_tests"] == {"ran": False, "why": "--skip-tests"}
