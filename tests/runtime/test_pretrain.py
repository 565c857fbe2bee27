"""Pretraining under BCD: from a random embedding and head, training them in blocks is what lets the loss fall.

A tiny Llama (hidden 64, vocabulary 256) reads a learnable stream: one random cycle through all 256 tokens,
repeated, so the next token is a function of the current one (a bigram table the model can learn to loss ~0).
Two BCD runs see the same windows at equal tokens and differ only in whether the embedding and the head are
in the blocks: ((1, 2), (3, 4)) frozen against ((0, 2), (3, 5)) trained.

Why the frozen run cannot go low, as a bound computed from its own head: the head's final norm (weight 1,
frozen) hands lm_head a vector n with ||n|| <= sqrt(hidden), so logit differences obey
z_y - z_v = (w_y - w_v) . n <= ||w_y - w_v|| sqrt(hidden), and the cross-entropy of any target y is at least
log(1 + sum_{v != y} exp(-||w_y - w_v|| sqrt(hidden))). With lm_head at its init (std 0.02) that floor is
3.46 nats here, whatever the decoder layers learn (ln 256 = 5.55). The test checks the frozen run never beats the
floor (its head really stayed frozen: it ends at 5.06) and that the trained run ends at least half a nat below the
floor and two below the frozen run (it ends at 2.49 after 80 steps; the runs are deterministic on the CPU, the
margins leave room for another torch's kernels).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

from runtime.optim import AdamWConfig
from runtime.trainer import TrainConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import TINY, tiny_plan, train  # noqa: E402

STEPS = 80
TC = TrainConfig(steps=STEPS, lr=3e-2, min_lr=3e-3, warmup=5, quiet=True, track_temporaries=False,
                 adamw=AdamWConfig(weight_decay=0.0, clip=1.0))


def cycle_tokens(path, vocab: int = TINY.vocab, repeats: int = 100) -> str:
    order = np.random.default_rng(0).permutation(vocab)
    np.tile(order, repeats).astype(np.uint16).tofile(path)
    return str(path)


def frozen_head_floor(lm_head: torch.Tensor) -> float:
    """The smallest cross-entropy a model can reach with this lm_head behind a unit-weight RMSNorm (module doc)."""
    w = lm_head.double()
    dist = torch.cdist(w, w) * math.sqrt(w.shape[1])
    off = ~torch.eye(w.shape[0], dtype=torch.bool)
    per_target = torch.log1p(torch.where(off, torch.exp(-dist), torch.zeros_like(dist)).sum(1))
    return per_target.min().item()


def test_training_the_embedding_and_head_under_bcd_learns_what_frozen_cannot(tmp_path):
    data = cycle_tokens(tmp_path / "cycle.bin")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: thread hand-offs would cost more than the math
    try:
        frozen, init, final_frozen, _ = train(tiny_plan(blocks=((1, 2), (3, 4)), steps_per_block=10), data, TC)
        trained, init2, final_trained, _ = train(tiny_plan(blocks=((0, 2), (3, 5)), steps_per_block=10), data, TC)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(init[k], init2[k]) for k in init)   # the same start
    assert frozen[0] == trained[0]                             # and the same first batch
    floor = frozen_head_floor(init["lm_head.weight"])
    assert 2.0 < floor < math.log(TINY.vocab)
    assert torch.equal(final_frozen["lm_head.weight"], init["lm_head.weight"])
    assert min(frozen) >= floor
    assert trained[-1] < floor - 0.5 and trained[-1] < frozen[-1] - 2.0, (floor, frozen[-1], trained[-1])
