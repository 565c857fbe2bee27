"""Every host byte the runtime holds is in the plan: the host ledger's peak against planner.memory's prediction.

What is counted: the host-tier buffers, the ones a CUDA run keeps in host RAM. Every one of them comes from the
runtime's one host allocator (runtime.hostio.HostMemory: pinned weights, offloaded activations, NVMe staging,
optimizer state, fp32 gradient accumulators, the CPU AdamW's workspace, kept state), which counts the bytes each
buffer was asked for while its storage lives (not its alignment slack, under 8 KiB a buffer) and their peak. On
the CPU stand-in the "device" is host memory too, but its buffers are the device ledger's (tests/runtime/
test_bcd.py), not counted here; and the CPU run holds fp32 weights and no pinned gradient staging, so the
prediction is planner.memory's at float32 with cuda=False (Trainer.predicted_host_bytes).

The expected figure is also derived here, independently, from the plan's placements and the layer sizes at
float32: bytes per class per parameter, as written in planner/memory.py's docstring.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from planner.costs import layer_sizes
from planner.models import ModelConfig
from planner.profile import profile_model
from runtime.data import TokenData
from runtime.trainer import TrainConfig, Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_equivalence import P, tiny_plan, write_tokens  # noqa: E402

# Large enough that a buffer's 4 KiB alignment slack is noise (a decoder layer: ~0.7 M parameters, 2.9 MB in fp32)
SMALL = ModelConfig(name="small-host", hidden=256, layers=4, heads=4, kv_heads=2, ffn=704, vocab=1024, max_seq=512)
BLOCKS = ((1, 2), (3, 4))   # decoder layers, as the planner makes BCD blocks


def _pl(weights: str, state: str, acts: str) -> list:
    """Decoders as given; the embedding and head resident, their activations kept."""
    return [P(0, "gpu", "gpu", "gpu")] + [P(i, weights, state, acts) for i in range(1, 5)] + [P(5, "gpu", "gpu", "gpu")]


CASES = {
    "resident": _pl("gpu", "cpu", "gpu"),        # weights on the device, AdamW on the CPU
    "streamed": _pl("cpu", "gpu", "cpu"),        # weights streamed from pinned host memory, activations offloaded
    "nvme_state": _pl("gpu", "nvme", "recompute"),   # optimizer state in NVMe files, stepped on the CPU
}


def _expected(plan) -> int:
    """The plan's host bytes at float32 without CUDA, from the classes: pinned weights (4 B/param), one trainable
    saved set per offloaded layer, per trained layer of the largest block the state on the CPU (12 B) and the
    fp32 gradient accumulator (4 B) when the state is off the device, and at most two NVMe states (12 B each)
    plus the CPU AdamW's sqrt(v) (4 B) for the largest trained layer."""
    sizes = [layer_sizes(lp, plan.shape.micro_batch, plan.shape.seq_len)
             for lp in profile_model(plan.model, dtype="float32").layers]
    pls = plan.placements
    total = sum(sizes[p.layer].params * 4 for p in pls if p.weights == "cpu")
    total += sum(sizes[p.layer].saved_bytes for p in pls if p.activations == "cpu")
    per_block = []
    for b in plan.blocks:
        per_block.append(sum(sizes[i].params * ((12 if pls[i].master == "cpu" else 0) + 4)
                             for i in b.layers if pls[i].master != "gpu"))
    total += max(per_block)
    biggest = max(sizes[i].params for b in plan.blocks for i in b.layers)
    states = {pls[i].master for b in plan.blocks for i in b.layers}
    total += 2 * 12 * biggest if "nvme" in states else 0
    total += 4 * biggest if states - {"gpu"} else 0
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_host_peak_within_the_plans_prediction(tmp_path, case):
    plan = tiny_plan(CASES[case], cfg=SMALL, blocks=BLOCKS, steps_per_block=2)
    data = TokenData.open(write_tokens(tmp_path / "tokens.bin", vocab=SMALL.vocab), seq_len=plan.shape.seq_len,
                          seed=0)
    cfg = TrainConfig(steps=2 * len(plan.blocks) * plan.steps_per_block, quiet=True, force_cpu=True,
                      nvme_dir=str(tmp_path / "nvme"))
    tr = Trainer(plan, data, cfg)
    try:
        start = tr.store.host.settle()   # weights placed before training: the pinned tier's, no more
        for _ in range(cfg.steps):       # two cycles: every block entered twice, every switch made
            tr.step()
        peak = tr.store.host.peak_bytes
        predicted = tr.predicted_host_bytes()
    finally:
        tr.close()
    assert tr.target.weight_dtype == torch.float32
    assert predicted == _expected(plan), (predicted, _expected(plan))
    assert predicted > 0 and start <= peak
    print(f"{case}: host peak {peak / 2**20:.2f} MiB, predicted {predicted / 2**20:.2f} MiB "
          f"({peak / predicted:.1%})")
    assert 0.9 * predicted <= peak <= predicted, (case, peak, predicted)


def test_the_cuda_figure_adds_the_staging_buffers():
    """On CUDA the host optimizer also holds one pinned bf16 buffer its device gradients land in and the updated
    bf16 weights of two layers on their way back (the schedule lets a host-stepped layer start only once the one
    two before it is done): 3 x the largest trained layer's weight bytes over the CPU stand-in's figure."""
    from planner import memory
    plan = tiny_plan(CASES["nvme_state"], cfg=SMALL, blocks=BLOCKS)
    sizes = [layer_sizes(lp, plan.shape.micro_batch, plan.shape.seq_len) for lp in profile_model(SMALL).layers]
    biggest = max(sizes[i].param_bytes for b in plan.blocks for i in b.layers)
    assert sizes[1].param_bytes == 2 * sizes[1].params   # bf16
    assert memory.host_bytes(plan, sizes, cuda=True) - memory.host_bytes(plan, sizes, cuda=False) == 3 * biggest
    assert plan.predicted.host_ram_bytes == memory.host_bytes(plan, sizes, cuda=True)
    assert dataclasses.asdict(plan)["placements"][1]["master"] == "nvme"
