"""Tied embeddings (lm_head shares the embedding matrix: Qwen2 0.5B-3B, Llama 3.2 1B/3B). A tied transformers
model trained from its save_pretrained directory: tests/runtime/test_equivalence.py (HF_CASES).

The runtime gives the head its own copy of the matrix, so the embedding and the head stream independently. Frozen,
the copies stay equal trivially; trained (pretraining, runtime.model.TiedMatrix), the matrix is one parameter,
trained in the embedding's block with the gradients of both uses, and the head's copy is rewritten from it, so a
run equals a real tied model's plain PyTorch BCD loop bitwise and the copies never diverge.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

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
# optimizer state and gradients of the embedding and the head on the host, the head's copy on NVMe
HOST_STATE = [P(0, "gpu", "cpu", "gpu"), P(1, "cpu", "gpu", "recompute"), P(2, "nvme", "nvme", "cpu"),
              P(3, "gpu", "gpu", "gpu"), P(4, "cpu", "cpu", "gpu"), P(5, "nvme", "cpu", "recompute")]


def test_the_profile_counts_the_matrix_once_but_sizes_the_heads_copy():
    tied, untied = profile_model(TIED), profile_model(TINY)
    assert tied.total_params == untied.total_params - TINY.vocab * TINY.hidden
    assert tied.layers[-1].param_bytes == untied.layers[-1].param_bytes  # the head holds the matrix where it runs


def _run(plan, tmp_path, steps: int):
    data = write_tokens(tmp_path / "tokens.bin")
    tc = dataclasses.replace(TC, nvme_dir=str(tmp_path / "nvme"), steps=steps)
    tokens = TokenData.open(data, seq_len=plan.shape.seq_len, seed=0)
    tr = Trainer(plan, tokens, dataclasses.replace(tc, force_cpu=True))
    try:
        init = tr.weights()
        losses = [tr.step()["loss"] for _ in range(tc.steps)]
        final = tr.weights()
        head = tr.store.get(plan.n_layers - 1)  # the head's own copy of the matrix, where the plan put it
        head = tr.layouts[-1].views(head)[tr.layouts[-1].names.index("lm_head.weight")].clone()
    finally:
        tr.close()
    ref_losses, ref_final = reference_bcd(plan, init, data, tc, tc.steps)  # a real tied LlamaModel
    return losses, init, final, head, ref_losses, ref_final


def test_bcd_with_tied_embeddings_frozen_equals_plain_pytorch_bitwise(tmp_path):
    plan = tiny_plan(PLACEMENTS, cfg=TIED, blocks=((1, 2), (3, 4)), order="descending", switch_state="keep_cpu")
    losses, init, final, head, ref_losses, ref_final = _run(plan, tmp_path, 8)
    assert "lm_head.weight" not in init and "lm_head.weight" not in final  # saved once, as Hugging Face does
    assert torch.equal(head, init["model.embed_tokens.weight"])
    assert torch.equal(head, final["model.embed_tokens.weight"])
    assert losses == ref_losses
    assert all(torch.equal(final[k], ref_final[k]) for k in final)
    assert any(not torch.equal(final[k], init[k]) for k in final)


TRAINED = {
    # joined to the bottom / top blocks; keep_cpu carries the head's state (and its stale slice of the matrix)
    # across the embedding's phase: the copy must still follow the embedding
    "joined keep_cpu": dict(placements=PLACEMENTS, blocks=((0, 1), (2, 3), (4, 5)), switch_state="keep_cpu",
                            steps_per_block=1),
    # alone, the state and gradients on the host, two micro-batches summing both uses per micro-batch
    "own blocks, host state": dict(placements=HOST_STATE, blocks=((0, 0), (1, 4), (5, 5)), order="random",
                                   steps_per_block=2),
    "full": dict(placements=HOST_STATE, method="full"),
}


@pytest.mark.parametrize("case", list(TRAINED))
def test_a_trained_tied_matrix_is_one_parameter_bitwise(tmp_path, case):
    plan = tiny_plan(cfg=TIED, **TRAINED[case])
    assert plan.shape.grad_accum == 2
    check_supported(plan)   # refused before pretraining existed
    losses, init, final, head, ref_losses, ref_final = _run(plan, tmp_path, 9)
    assert "lm_head.weight" not in final
    emb = final["model.embed_tokens.weight"]
    assert not torch.equal(emb, init["model.embed_tokens.weight"])   # trained
    assert torch.equal(head, emb)                                    # the head's copy followed it
    assert losses == ref_losses
    assert final.keys() == ref_final.keys()
    assert all(torch.equal(final[k], ref_final[k]) for k in final), \
        [k for k in final if not torch.equal(final[k], ref_final[k])]


def test_a_trained_tied_matrix_resumes_exactly_and_is_saved_once(tmp_path):
    """Stopped inside the embedding's phase (the head's copy and the hooks' state must come back) and resumed:
    the same losses, weights and optimizer state as the straight run; the matrix saved once."""
    from planner.plan import write_atomic
    from runtime.checkpoint import load_checkpoint
    from tools.cli import run as cli

    plan = tiny_plan(HOST_STATE, cfg=TIED, blocks=((0, 2), (3, 5)), switch_state="keep_cpu", steps_per_block=2)
    write_atomic(str(tmp_path / "plan.json"), plan.to_json())
    write_tokens(tmp_path / "tokens.bin")

    def train(ckpt, *extra):
        return cli(["train", "--plan", str(tmp_path / "plan.json"), "--data", str(tmp_path / "tokens.bin"),
                    "--steps", "7", "--cpu", "--quiet", "--ckpt-dir", str(tmp_path / ckpt), "--nvme-dir",
                    str(tmp_path / f"nvme-{ckpt}"), "--lr", "1e-2", "--metrics", str(tmp_path / f"{ckpt}.jsonl"),
                    *extra])
    assert train("straight") == 0
    assert train("stopped", "--stop-after", "5") == 0    # mid-phase: step 5 opens the embedding's second phase
    assert train("stopped", "--resume") == 0
    want, got = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "stopped"))
    assert (tmp_path / "straight.jsonl").read_text().count("loss") == 7
    losses = [line.split('"loss": ')[1].split(",")[0] for line in (tmp_path / "stopped.jsonl").read_text().splitlines()]
    assert losses == [line.split('"loss": ')[1].split(",")[0]
                      for line in (tmp_path / "straight.jsonl").read_text().splitlines()]
    assert "lm_head.weight" not in got.weights and "model.embed_tokens.weight" in got.weights
    assert got.weights.keys() == want.weights.keys()
    assert all(torch.equal(got.weights[k], want.weights[k]) for k in want.weights)
    assert all(torch.equal(got.optimizer[k], want.optimizer[k]) for k in want.optimizer)
