"""Every size flag of every subcommand takes the same sizes (planner/units.py), and an NVMe capacity means what it
says: a plan needing X bytes of NVMe is accepted at the capacity whose usable share is X, refused just below."""
from __future__ import annotations

import json
import math

import pytest

from planner.hardware import GIB
from planner.memory import Tier
from planner.models import CATALOG
from planner.profile import profile_model
from tools.cli import run


def cli(capsys, *args):
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_flags_take_units(capsys):
    code, out, err = cli(capsys, "plan", "--model", "tiny", "--gpu", "rtx4090", "--vram", "2GB", "--reserve",
                         "512MiB", "--host-ram", "0.5TiB", "--nvme", "2TB", "--seq", "128", "--json")
    assert code == 0, err
    p = json.loads(out)
    assert p["budget_bytes"] == int(2e9)
    assert p["reserve_bytes"] == 512 * 2**20
    assert p["hardware"]["host"]["ram_gib"] == 512.0
    assert p["hardware"]["host"]["nvme_gib"] == pytest.approx(2e12 / GIB)


def test_simulate_and_sweep_flags_take_units(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert cli(capsys, "plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--out", str(path))[0] == 0
    code, out, err = cli(capsys, "simulate", "--plan", str(path), "--vram", "4GB", "--host-ram", "64G", "--json")
    assert code == 0, err
    code, out, err = cli(capsys, "sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "1GiB,2000MB",
                         "--host-ram", "32GiB", "--seq", "128", "--workers", "1", "--json")
    assert code == 0, err
    assert sorted(r["vram_gib"] for r in json.loads(out)["rows"]) == pytest.approx([1.0, 2e9 / GIB])
    code, out, err = cli(capsys, "sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "1GiB:2GiB:512MiB",
                         "--seq", "128", "--workers", "1", "--json")
    assert code == 0, err
    assert [r["vram_gib"] for r in json.loads(out)["rows"]] == [1.0, 1.5, 2.0]


@pytest.mark.parametrize("argv", [
    ["plan", "--model", "tiny", "--vram"], ["plan", "--model", "tiny", "--host-ram"],
    ["plan", "--model", "tiny", "--nvme"], ["plan", "--model", "tiny", "--reserve"],
    ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram"],
    ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--host-ram"],
])
@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "-2TB", "garbage", "12parsecs"])
def test_bad_sizes_exit_2_naming_the_flag(capsys, argv, bad):
    flag = argv[-1]
    code, _, err = cli(capsys, *argv[:-1], f"{flag}={bad}")  # --flag=-2TB: argparse would read -2TB as a flag
    assert code == 2
    assert "Traceback" not in err
    assert f"{flag} must be" in err and "GiB" in err


def test_simulate_bad_sizes_exit_2(tmp_path, capsys):
    path = tmp_path / "p.json"
    assert cli(capsys, "plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--out", str(path))[0] == 0
    for flag in ("--vram", "--host-ram"):
        code, _, err = cli(capsys, "simulate", "--plan", str(path), flag, "nan")
        assert code == 2 and f"{flag} must be" in err


def test_nvme_capacity_boundary(capsys):
    """With --switch-state keep_nvme every trained parameter's fp32 master and two AdamW moments (4 + 4 + 4 bytes)
    live on NVMe; nothing else needs to (VRAM and host RAM are ample). That is X; the ILP counts in KiB, rounded
    up, against the usable share of the drive (Tier.NVME.usable_fraction, the constant the planner uses)."""
    cfg = CATALOG["tiny"]
    prof = profile_model(cfg)
    decoder_params = sum(lp.params for lp in prof.layers if lp.kind == "decoder")  # bcd trains the decoders
    x_bytes = decoder_params * (4 + 4 + 4)
    x_kib = math.ceil(x_bytes / 1024)
    enough = math.ceil(x_kib * 1024 / Tier.NVME.usable_fraction) + 2  # bytes: usable share >= X, 2 B of slack
    base = ["plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--switch-state", "keep_nvme", "--json"]
    code, out, err = cli(capsys, *base, "--nvme", f"{enough}B")
    assert code == 0, err
    p = json.loads(out)
    assert p["predicted"]["nvme_bytes"] == x_bytes
    assert p["predicted"]["nvme_bytes"] <= enough * Tier.NVME.usable_fraction
    code, _, err = cli(capsys, *base, "--nvme", f"{enough - 1100}B")  # about 1 KiB less drive
    assert code == 2, "a plan needing more NVMe than the drive's usable share was accepted"
    assert "NVMe" in err


def test_nvme_is_gib_like_every_size_flag(capsys):
    """The issue's case: '--nvme 850' was documented as GB but read as GiB. Now a bare number is GiB (as for every
    size flag) and '850GB' is 850e9 bytes."""
    base = ["plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--json"]
    for text, gib in (("850", 850.0), ("850GB", 850e9 / GIB), ("2TB", 2e12 / GIB)):
        code, out, _ = cli(capsys, *base, "--nvme", text)
        assert code == 0 and json.loads(out)["hardware"]["host"]["nvme_gib"] == pytest.approx(gib, rel=1e-12)
