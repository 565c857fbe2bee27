"""An infeasible plan names the resource that binds, with a figure of it that is enough and not much more: the plan
command run at the figure the message gives plans, 1% below it does not (exit 2 both times it refuses)."""
from __future__ import annotations

import re

import pytest

from planner import planning
from planner.hardware import GIB
from planner.memory import Tier
from planner.models import CATALOG
from planner.profile import profile_model
from planner.units import size_gib
from tools.cli import run

TINY = ["plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--reserve", "1MiB"]


def cli(capsys, *args):
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, err


def figure(err: str, flag: str) -> float:
    """The size the message suggests for `flag`, in GiB."""
    return size_gib(flag, re.search(rf"{flag} (\S+?)[ ;)]", err).group(1))


def below(gib: float) -> str:
    return f"{int(gib * GIB * 0.99)}B"


def test_full_70b_names_host_ram_not_vram(capsys):
    """The issue's case: 70B full-parameter training, 256 GiB host RAM and a 2000 GiB drive. The fp32 gradient
    buffer alone (4 bytes per parameter) is more than the host's usable RAM: host RAM binds, not VRAM."""
    base = ["plan", "--model", "70b", "--gpu", "rtx4090", "--vram", "24", "--method", "full", "--nvme", "2000"]
    code, err = cli(capsys, *base, "--host-ram", "256")
    assert code == 2 and "Traceback" not in err
    assert "host RAM binds" in err and "VRAM binds" in err
    assert err.index("host RAM binds") < err.index("VRAM binds")  # the smaller step first
    assert "more NVMe (--nvme) alone does not make it fit" in err
    need = figure(err, "--host-ram")
    grads = 4 * profile_model(CATALOG["70b"]).total_params
    assert need * GIB * Tier.CPU.usable_fraction >= grads
    assert cli(capsys, *base, "--host-ram", f"{need}")[0] == 0
    assert cli(capsys, *base, "--host-ram", below(need))[0] == 2


def test_each_binding_resource_is_named_with_a_sufficient_figure(capsys):
    """1B at sequence 512 in a 3 GiB budget with 2 GiB of host RAM and no drive: more VRAM, more host RAM or an NVMe
    drive would each do; the message gives each figure, and each is enough and not 1% more than enough."""
    base = ["plan", "--model", "1b", "--gpu", "rtx4090", "--seq", "512"]
    code, err = cli(capsys, *base, "--vram", "3", "--host-ram", "2")
    assert code == 2
    assert "host RAM binds" in err and "NVMe binds" in err and "VRAM binds" in err
    host, nvme, vram = figure(err, "--host-ram"), figure(err, "--nvme"), figure(err, "--vram")
    assert cli(capsys, *base, "--vram", "3", "--host-ram", f"{host * GIB:.0f}B")[0] == 0
    assert cli(capsys, *base, "--vram", "3", "--host-ram", below(host))[0] == 2
    assert cli(capsys, *base, "--vram", "3", "--host-ram", "2", "--nvme", f"{nvme * GIB:.0f}B")[0] == 0
    assert cli(capsys, *base, "--vram", "3", "--host-ram", "2", "--nvme", below(nvme))[0] == 2
    assert cli(capsys, *base, "--vram", f"{vram * GIB:.0f}B", "--host-ram", "2")[0] == 0


def test_a_resource_that_does_not_bind_is_said_not_to(capsys):
    code, err = cli(capsys, *TINY, "--vram", "2MiB", "--host-ram", "2MiB")
    assert code == 2
    assert "VRAM binds" in err
    assert "more host RAM (--host-ram) or NVMe (--nvme) alone does not make it fit" in err


def test_keep_nvme_without_a_drive_asks_for_one(capsys):
    base = ["plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "128", "--switch-state", "keep_nvme"]
    code, err = cli(capsys, *base)
    assert code == 2 and "Traceback" not in err
    assert "NVMe tier" in err and "--nvme" in err and "bf16" not in err
    # 12 bytes of fp32 master and moments per trained (decoder) parameter, over the drive's usable share
    prof = profile_model(CATALOG["tiny"])
    need = sum(lp.params for lp in prof.layers if lp.kind == "decoder") * 12 / Tier.NVME.usable_fraction
    suggested = figure(err, "--nvme")
    assert need <= suggested * GIB <= need * 1.05
    assert cli(capsys, *base, "--nvme", f"{suggested * GIB:.0f}B")[0] == 0


def test_a_search_out_of_time_says_so(capsys, monkeypatch):
    """When the search returns nothing but a plan exists at this budget, the message says the time limit bit."""
    monkeypatch.setattr(planning, "search", lambda *a, **k: None)
    code, err = cli(capsys, *TINY)
    assert code == 2
    assert "within its time limit" in err and "--time-limit" in err and "binds" not in err


@pytest.mark.parametrize("flag", ["--host-ram", "--nvme"])
def test_the_weights_check_names_sizes_in_gib(capsys, flag):
    code, err = cli(capsys, "plan", "--model", "70b", "--gpu", "rtx4090", "--host-ram", "32")
    assert code == 2 and flag in err and " GB)" not in err
