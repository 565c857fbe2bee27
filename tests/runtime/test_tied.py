"""Tied embeddings (lm_head shares the embedding matrix: Qwen2 0.5B-3B, Llama 3.2 1B/3B). A tied transformers
model trained from its save_pretrained directory: tests/runtime/test_equivalence.py (HF_CASES).

The runtime gives the head its own copy of the matrix, so the embedding and the head stream independently; that is
exact while both stay frozen, as in BCD's blocks of decoder layers, and a plan that trains either is refused.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

from planner.errors import UserError
from planner.profile import profile_model
from runtime.data import TokenData
from runtime.guards import check_supported
from runtime.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import TC, TINY, P, reference_bcd, tiny_plan, write_tokens  # noqa: E402

TIED = dataclasses.replace(TINY, name="tiny-tied", tie_embeddings=True)
# the embedding streamed from NVMe, the head from pinned host memory: the two copies of the matrix move apart
PLACEMENTS = [P(0, "nvme", "gpu", "gpu"), P(1, "gpu", "cpu", "recompute"), P(2, "cpu", "gpu", "cpu"),
              P(3, "nvme", "gpu", "gpu"), P(4, "gpu", "nvme", "recompute"), P(5, "cpu", "gpu", "gpu")]


def test_the_profile_counts_the_matrix_once_but_sizes_the_heads_copy():
    tied, untied = profile_model(TIED), profile_model(TINY)
    assert tied.total_params == untied.total_params - TINY.vocab * TINY.hidden
    assert tied.layers[-1].param_bytes == untied.layers[-1].param_bytes  # the head holds the matrix where it runs


def test_bcd_with_tied_embeddings_equals_plain_pytorch_bitwise(tmp_path):
    plan = tiny_plan(PLACEMENTS, cfg=TIED, blocks=((1, 2), (3, 4)), order="descending", switch_state="keep_cpu")
    data = write_tokens(tmp_path / "tokens.bin")
    tc = dataclasses.replace(TC, nvme_dir=str(tmp_path / "nvme"), steps=8)
    tokens = TokenData.open(data, seq_len=plan.shape.seq_len, seed=0)
    tr = Trainer(plan, tokens, dataclasses.replace(tc, force_cpu=True))
    try:
        init = tr.weights()
        losses = [tr.step()["loss"] for _ in range(tc.steps)]
        final = tr.weights()
        head = tr.store.get(plan.n_layers - 1)  # the head's own copy of the matrix, where the plan put it
        head = tr.layouts[-1].views(head)[tr.layouts[-1].names.index("lm_head.weight")]
    finally:
        tr.close()
    assert "lm_head.weight" not in init and "lm_head.weight" not in final  # saved once, as Hugging Face does
    assert torch.equal(head, init["model.embed_tokens.weight"])
    assert torch.equal(head, final["model.embed_tokens.weight"])
    ref_losses, ref_final = reference_bcd(plan, init, data, tc, tc.steps)  # a real tied LlamaModel
    assert losses == ref_losses
    assert all(torch.equal(final[k], ref_final[k]) for k in final)
    assert any(not torch.equal(final[k], init[k]) for k in final)


@pytest.mark.parametrize("blocks, method, what", [(((0, 2), (3, 5)), "bcd", "the embedding (layer 0) and the head"),
                                                  (None, "full", "the embedding (layer 0) and the head")])
def test_training_a_tied_embedding_or_head_is_refused(blocks, method, what):
    kw = {"blocks": blocks} if blocks else {}
    plan = tiny_plan(PLACEMENTS, cfg=TIED, method=method, **kw)
    with pytest.raises(UserError, match="ties its embedding and lm_head") as e:
        check_supported(plan)
    assert what in str(e.value)
    check_supported(tiny_plan(PLACEMENTS, cfg=TIED, blocks=((1, 4),)))  # decoder layers only: fine
