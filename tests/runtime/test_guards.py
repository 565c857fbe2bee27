"""Guard rails: each bad start exits 2 with one clear paragraph, before anything is written."""
from __future__ import annotations

import json
import os
import sys
from collections import namedtuple

import pytest

from planner.models import ModelConfig
from planner.plan import load_plan, write_atomic
from runtime import guards
from runtime.hf import hf_config_dict
from tools.cli import run as cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import CASES, P, tiny_plan, write_tokens  # noqa: E402

Disk = namedtuple("Disk", "total used free percent")
Mem = namedtuple("Mem", "total available")


@pytest.fixture
def setup(tmp_path):
    plan = tiny_plan(**CASES["tiers-ascending-reset"])  # weights and state on NVMe
    write_atomic(str(tmp_path / "plan.json"), plan.to_json())
    write_tokens(tmp_path / "tokens.bin")
    return tmp_path


def _train(tmp_path, *extra, nvme=True) -> list[str]:
    args = ["train", "--plan", str(tmp_path / "plan.json"), "--data", str(tmp_path / "tokens.bin"), "--cpu",
            "--steps", "2", "--ckpt-dir", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.jsonl"),
            "--trace", str(tmp_path / "t.json"), "--quiet", *extra]
    return args + (["--nvme-dir", str(tmp_path / "nvme")] if nvme else [])


def _refused(capsys, args, *phrases, before=None) -> None:
    tmp = os.path.dirname(args[args.index("--plan") + 1])
    before = before if before is not None else set(os.listdir(tmp))
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err   # one paragraph
    for phrase in phrases:
        assert phrase in err, err
    assert set(os.listdir(tmp)) == before   # no checkpoint dir, no NVMe files, no metrics, no trace


def _need_in_message(capsys, args) -> float:
    """The bytes the refusal says the plan needs (a figure with a binary unit)."""
    import re
    assert cli(args) == 2
    m = re.search(r"the plan needs ([0-9.]+) (B|KiB|MiB|GiB|TiB)", capsys.readouterr().err)
    return float(m.group(1)) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(m.group(2)) * 1.005  # 2 decimals


def test_a_plan_for_another_model(setup, capsys):
    other = ModelConfig(name="other", hidden=128, layers=4, heads=4, kv_heads=2, ffn=176, vocab=256, max_seq=512)
    (setup / "hf").mkdir()
    (setup / "hf" / "config.json").write_text(json.dumps(hf_config_dict(other)))
    _refused(capsys, _train(setup, "--init-from", str(setup / "hf")), "the plan was made for another model")


def test_nvme_without_space(setup, capsys, monkeypatch):
    monkeypatch.setattr(guards.psutil, "disk_usage", lambda path: Disk(10**12, 10**12 - 4096, 4096, 100.0))
    # sizes in a unit that shows them (it said "0.00 GiB free, needs 0.00 GiB"): 4096 bytes free, and the plan's
    # need, which is at least its predicted NVMe bytes
    _refused(capsys, _train(setup), "has 4.00 KiB free, but the plan needs", "--nvme-dir")
    err_need = _need_in_message(capsys, _train(setup))
    plan = load_plan(str(setup / "plan.json"))
    assert err_need >= plan.predicted.nvme_bytes > 0


def test_nvme_tier_without_a_directory(setup, capsys):
    _refused(capsys, _train(setup, nvme=False), "give a directory on the NVMe drive with --nvme-dir")


def test_host_ram_below_the_plans_need(setup, capsys, monkeypatch):
    monkeypatch.setattr(guards.psutil, "virtual_memory", lambda: Mem(1 << 30, 1024))
    _refused(capsys, _train(setup), "has 1.00 KiB of host RAM available, but the plan needs")
    assert _need_in_message(capsys, _train(setup)) >= load_plan(str(setup / "plan.json")).predicted.host_ram_bytes > 0


def test_data_shorter_than_one_step(setup, capsys):
    write_tokens(setup / "tokens.bin", n=3 * 33)   # 3 windows of seq 32 + 1; a step needs 2 x 2
    _refused(capsys, _train(setup), "holds 3 windows", "one step needs 4")


def test_unreadable_checkpoint(setup, capsys):
    step = setup / "old" / "step-000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{not json")
    _refused(capsys, _train(setup, "--resume", str(setup / "old")), "meta.json is unreadable or corrupt")


def test_a_checkpoint_directory_of_another_run(setup, capsys):
    (setup / "ck" / "step-000002").mkdir(parents=True)
    before = set(os.listdir(setup))
    _refused(capsys, _train(setup), "already holds checkpoints; pass --resume", before=before)
    assert os.listdir(setup / "ck") == ["step-000002"]


def test_bad_numbers_and_unsupported_plans(setup, capsys):
    _refused(capsys, _train(setup, "--lr", "-1"), "--lr must be a positive number")
    _refused(capsys, _train(setup, "--min-lr", "1"), "--min-lr (1.0) is above --lr")
    split = tiny_plan([P(i, "gpu", "gpu", "gpu") for i in range(6)])
    split = split.__class__(**{**split.__dict__, "placements": tuple(
        p.__class__(**{**p.__dict__, "moments": "cpu"}) if p.layer == 2 else p for p in split.placements)})
    write_atomic(str(setup / "plan.json"), split.to_json())
    _refused(capsys, _train(setup), "layer 2 keeps its master weights on 'gpu' but its moments on 'cpu'")


def test_a_good_start_writes_what_it_was_asked_to(setup, capsys):
    assert cli(_train(setup)) == 0
    assert {"ck", "m.jsonl", "t.json", "nvme"} <= set(os.listdir(setup))
    assert os.listdir(setup / "nvme") == []   # the NVMe scratch directory is removed at the end


def test_a_checkpoint_of_another_plan(setup, capsys):
    assert cli(_train(setup)) == 0
    other = tiny_plan(**{**CASES["tiers-ascending-reset"], "steps_per_block": 3})
    write_atomic(str(setup / "plan.json"), other.to_json())
    before = set(os.listdir(setup / "ck"))
    _refused(capsys, _train(setup, "--resume"), "was trained under another plan (steps_per_block differ)")
    assert set(os.listdir(setup / "ck")) == before
