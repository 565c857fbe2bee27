"""The runtime holds a plan's VRAM budget on CUDA (runtime/device.py), checked on the CPU with a fake card.

The fake probe stands for torch.cuda.mem_get_info / get_device_name / set_per_process_memory_fraction; the
expected fraction is computed here from the figures the fake reports (budget / total), not by the code under test.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from planner.errors import UserError
from runtime.device import CardMemory, CudaProbe, hold_budget
from runtime.store import Target

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_equivalence import tiny_plan, write_tokens  # noqa: E402

GIB = 1 << 30


class FakeCard:
    def __init__(self, *, total_gib: float, free_bytes: int, name: str = "Fake H100"):
        self.card = CardMemory(name=name, total_bytes=int(total_gib * GIB), free_bytes=free_bytes)
        self.caps: list[tuple[float, int]] = []
        self.asked: list[int] = []

    def memory(self, index: int) -> CardMemory:
        self.asked.append(index)
        return self.card

    def cap(self, fraction: float, index: int) -> None:
        self.caps.append((fraction, index))


def _plan(budget_gib: float):
    plan = tiny_plan()
    return dataclasses.replace(plan, budget_bytes=int(budget_gib * GIB))


def test_caps_the_allocator_at_the_budget_over_the_card():
    plan = _plan(24)
    card = FakeCard(total_gib=80, free_bytes=70 * GIB)
    got = hold_budget(plan, 1, card)
    assert card.asked == [1]
    assert card.caps == [(24 / 80, 1)]          # 24 GiB of an 80 GiB card
    assert got.fraction == 24 / 80 and got.need_bytes == max(p.peak_vram_bytes for p in plan.predicted.phases)


def test_a_budget_above_the_card_caps_at_the_whole_card():
    card = FakeCard(total_gib=16, free_bytes=15 * GIB)
    hold_budget(_plan(24), 0, card)
    assert card.caps == [(1.0, 0)]


def test_a_card_with_less_free_memory_than_the_peak_is_refused_before_the_cap():
    plan = _plan(24)
    need = max(p.peak_vram_bytes for p in plan.predicted.phases)
    card = FakeCard(total_gib=80, free_bytes=need - 1)
    with pytest.raises(UserError) as e:
        hold_budget(plan, 0, card)
    msg = str(e.value)
    assert card.caps == []                       # nothing capped, nothing allocated
    assert "\n" not in msg and "Fake H100" in msg
    assert f"{(need - 1) / GIB:.2f} GiB free" in msg and f"needs {need / GIB:.2f} GiB" in msg
    # exactly the peak free is enough
    ok = FakeCard(total_gib=80, free_bytes=need)
    hold_budget(plan, 0, ok)
    assert ok.caps == [(24 / 80, 0)]


def test_train_on_a_full_card_exits_2_with_one_paragraph(tmp_path, monkeypatch, capsys):
    """`blockfit train` on a (fake) CUDA card with no room: refused before the runtime allocates anything."""
    from tools.cli import run
    plan = tiny_plan()
    card = FakeCard(total_gib=24, free_bytes=1 << 20, name="Busy GPU")
    monkeypatch.setattr(CudaProbe, "memory", lambda self, index: card.memory(index))
    monkeypatch.setattr(CudaProbe, "cap", lambda self, f, index: card.cap(f, index))
    cuda = Target(device=torch.device("cuda", 0), weight_dtype=torch.bfloat16, align_numel=64)
    monkeypatch.setattr(Target, "detect", classmethod(lambda cls, force_cpu=False: cuda))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    nvme = tmp_path / "nvme"
    code = run(["train", "--plan", str(plan_path), "--data", write_tokens(tmp_path / "t.bin"), "--quiet",
                "--nvme-dir", str(nvme)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and "Busy GPU" in err and "free" in err
    assert card.asked == [0] and card.caps == []
    assert not nvme.exists() or os.listdir(nvme) == []


@pytest.mark.parametrize("name, gpu", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-40GB", "a100-40g"), ("NVIDIA A100-SXM4-80GB", "a100-80g"), ("NVIDIA A100 80GB PCIe", "a100-80g"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA GeForce RTX 3090", "rtx3090"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA A800-SXM4-80GB", "a800-80g"), ("Tesla T4", None), ("NVIDIA GeForce RTX 4080", None)])
def test_a_cuda_device_name_maps_to_its_catalog_gpu(name, gpu):
    from planner.hardware import gpu_names
    from runtime.device import catalog_gpu
    assert catalog_gpu(name) == gpu
    assert gpu is None or gpu in gpu_names()
