"""BCD semantics, checked inside the running runtime, and its device-memory ledger against the plan.

- At the optimizer step (every gradient complete): frozen parameters have requires_grad=False and no .grad; the
  active block's have their gradients (on the device, or in the host accumulator when the plan streams them).
- Optimizer state exists only for the active block's layers (and, under keep_*, the kept states of blocks
  trained before, nowhere else).
- Layers below the active block save nothing for backward: counted with saved_tensors_hooks installed innermost
  around each layer's forward, independently of the runtime's own hooks.
- The device ledger's peak never exceeds the plan's predicted peak and is within 10% of it.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from runtime.data import TokenData
from runtime.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import CASES, TC, P, tiny_plan, write_tokens  # noqa: E402


def _trainer(plan, tmp_path, **kw) -> Trainer:
    data = TokenData.open(write_tokens(tmp_path / "tokens.bin"), seq_len=plan.shape.seq_len, seed=0)
    tc = dataclasses.replace(TC, nvme_dir=str(tmp_path / "nvme"), force_cpu=True, **kw)
    return Trainer(plan, data, tc)


@pytest.mark.parametrize("case", ["tiers-ascending-reset", "descending-keep_cpu"])
def test_grads_and_state_only_in_the_active_block(tmp_path, case):
    plan = tiny_plan(**CASES[case])
    tr = _trainer(plan, tmp_path)
    seen = []
    clip = tr.optim.clip

    def checked_clip(block_grads):  # the step's first optimizer op calls block_grads: every gradient is there
        def checked():
            check()
            return block_grads()
        return clip(checked)

    def check():
        block = plan.blocks[tr.active]
        for i, layer in enumerate(tr.layers):
            for p in layer.parameters():
                if i in block.layers:
                    assert p.requires_grad
                    assert (p.grad is not None) == (plan.placement(i).grads == "gpu")
                else:
                    assert not p.requires_grad and p.grad is None
        assert set(tr.optim.host_grads) == {i for i in block.layers if plan.placement(i).grads == "cpu"}
        seen.append(tr.active)
    tr.optim.clip = checked_clip
    try:
        trained: set[int] = set()
        for _ in range(TC.steps):
            tr.step()
            block = plan.blocks[tr.active]
            trained |= set(block.layers)
            assert set(tr.optim.states) == set(block.layers)
            kept = set(tr.optim.kept)
            if plan.switch_state == "reset":
                assert not kept
            else:
                assert kept <= trained - set(block.layers)
            assert all(p.grad is None for layer in tr.layers for p in layer.parameters())
        assert len(seen) == TC.steps
    finally:
        tr.close()


def test_nothing_saved_below_the_active_block(tmp_path):
    plan = tiny_plan(blocks=((0, 1), (2, 3), (4, 5)), steps_per_block=1)  # every layer keeps its activations
    tr = _trainer(plan, tmp_path)
    counts = [0] * plan.n_layers

    def counting(i, forward):
        def run(*args):
            def pack(t):
                counts[i] += 1
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return forward(*args)
        return run
    for i, layer in enumerate(tr.layers):
        layer.forward = counting(i, layer.forward)
    try:
        for _ in range(3):
            counts[:] = [0] * plan.n_layers
            tr.step()
            first = plan.blocks[tr.active].first
            assert all(c == 0 for c in counts[:first]), counts
            assert all(c > 0 for c in counts[first:]), counts
            assert tr.ops.saved_tensors[:first] == [0] * first
    finally:
        tr.close()


@pytest.mark.parametrize("case", list(CASES))
def test_device_peak_within_the_plans_prediction(tmp_path, case):
    """Per phase: the ledger's peak (what the runtime holds between kernels, plus each compute op's kernel
    temporaries measured on the CPU) never exceeds the plan's predicted peak and is within 10% of it. The CPU
    holds float32 weights and gradients, so the prediction is the plan's schedule sized by the float32 profile
    (Trainer.predicted_peaks, which the run's summary reports)."""
    plan = tiny_plan(**CASES[case])
    tr = _trainer(plan, tmp_path, steps=len(plan.blocks) * plan.steps_per_block)
    try:
        for _ in range(tr.cfg.steps):
            tr.step()
            # after a step only the static classes remain: every activation and prefetch booked was freed
            live = tr.store.meter.live
            assert live.get("activations", 0) == 0 and live.get("prefetch", 0) == 0, live
    finally:
        tr.close()
    predicted = tr.predicted_peaks()
    assert predicted.keys() == tr.phase_peaks.keys() == set(range(len(plan.blocks)))
    for block, want in predicted.items():
        got = tr.phase_peaks[block]
        assert 0.9 * want <= got <= want, (block, got, want)


def test_kernel_temporaries_are_measured_not_assumed(tmp_path):
    """The ledger's transient bytes come from the tracker: turned off, the same run books none and peaks lower."""
    plan = tiny_plan(**CASES["tiers-ascending-reset"])
    peaks = {}
    for track in (True, False):
        (tmp_path / str(track)).mkdir()
        tr = _trainer(plan, tmp_path / str(track), steps=1, track_temporaries=track)
        try:
            tr.step()
            peaks[track] = tr.phase_peaks[tr.active]
        finally:
            tr.close()
    assert peaks[False] < peaks[True]


def test_weights_below_the_block_never_change(tmp_path):
    plan = tiny_plan([P(i, t, "cpu", "gpu") for i, t in enumerate(("gpu", "cpu", "nvme", "gpu", "cpu", "nvme"))],
                     blocks=((0, 2), (3, 5)), steps_per_block=2)
    tr = _trainer(plan, tmp_path, steps=2)
    try:
        before = tr.weights()
        tr.step()
        tr.step()
        after = tr.weights()
    finally:
        tr.close()
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert trained and all(k.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")) for k in trained)
