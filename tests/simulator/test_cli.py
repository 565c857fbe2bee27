"""Bad input to the simulator's commands: exit 2 with one clear paragraph on stderr, before any work."""
from __future__ import annotations

import json

import pytest

from tools.cli import run


@pytest.fixture(scope="module")
def plan_path(plan_file):
    return plan_file("tiny", "rtx4090", seq_len=256, batch=4)[1]


def _fails(argv, capsys, *words):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for w in words:
        assert w in err, err
    return err


def test_missing_plan(tmp_path, capsys):
    _fails(["simulate", "--plan", str(tmp_path / "nope.json")], capsys, "does not exist")


def test_corrupt_plan(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text('{"schema": 1, "model": ')
    _fails(["simulate", "--plan", str(p)], capsys, "not readable JSON")


def test_old_schema_plan(plan_path, tmp_path, capsys):
    raw = json.load(open(plan_path))
    raw["schema"] = 0
    p = tmp_path / "old.json"
    p.write_text(json.dumps(raw))
    _fails(["simulate", "--plan", str(p)], capsys, "schema version 0")


def test_unknown_gpu_in_a_sweep(capsys):
    _fails(["sweep", "--model", "tiny", "--gpu", "rtx4090,rtx4099"], capsys, "unknown GPU 'rtx4099'",
           "did you mean")


def test_unknown_gpu_in_a_what_if(plan_path, capsys):
    _fails(["simulate", "--plan", plan_path, "--gpu", "a100"], capsys, "unknown GPU 'a100'")


def test_unknown_model_in_a_sweep(capsys):
    _fails(["sweep", "--model", "7bb", "--gpu", "rtx4090"], capsys, "unknown model '7bb'")


def test_unwritable_outputs(plan_path, tmp_path, capsys):
    missing = str(tmp_path / "no" / "such" / "dir" / "t.json")
    _fails(["simulate", "--plan", plan_path, "--trace", missing], capsys, "cannot write", "does not exist")
    _fails(["simulate", "--plan", plan_path, "--plot", str(tmp_path)], capsys, "is a directory")
    _fails(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--csv", missing], capsys, "cannot write")
    _fails(["calibrate", "--quick", "--out", missing], capsys, "cannot write")


def test_bad_override_values(plan_path, capsys):
    _fails(["simulate", "--plan", plan_path, "--vram", "-3"], capsys, "--vram")
    _fails(["simulate", "--plan", plan_path, "--micro-batch", "3"], capsys, "does not divide")
    _fails(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "8,x"], capsys, "--vram")


def test_compare_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    _fails(["compare", str(bad), str(other)], capsys, "not readable JSON")
    _fails(["compare", str(other), str(other)], capsys, "neither a Chrome trace")


def test_outputs_are_written(plan_path, tmp_path, capsys):
    trace, plot, summary = (str(tmp_path / n) for n in ("t.json", "m.png", "s.json"))
    assert run(["simulate", "--plan", plan_path, "--trace", trace, "--plot", plot, "--summary", summary]) == 0
    assert json.load(open(trace))["traceEvents"] and open(plot, "rb").read(4) == b"\x89PNG"
    assert json.load(open(summary))["step_seconds_by_phase"]
    assert "trace written" in capsys.readouterr().out
