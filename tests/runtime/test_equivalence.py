"""The runtime computes exactly what a plain PyTorch BCD loop computes.

The reference below is the textbook loop: the whole model under ordinary autograd (a tied model's lm_head is its
embedding's tensor, so autograd sums the gradients of both uses; the matrix trains with the embedding's block,
as one parameter, and the head's block trains the head's other parameters), the frozen layers with
requires_grad=False, torch.optim.AdamW over the active block's parameters only (a new one at every switch under
`reset`, one per block kept across switches otherwise), clip_grad_norm_, loss / grad_accum per micro-batch. On the
CPU in fp32 the runtime's losses and weights must equal it bitwise, under plans that together use every option:
weights on device / cpu / nvme, optimizer state on device / cpu / nvme, activations kept / recomputed / offloaded,
block order ascending / descending / random, state reset / keep_cpu / keep_nvme, and the `full` method. No
tolerance is needed anywhere: the layer-by-layer backward and the flat-buffer AdamW apply the same kernels to the
same numbers in the same order as the reference.

Other runtime tests import the helpers here (tiny_plan, write_tokens, reference_bcd, train).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from planner.hardware import make_hardware
from planner.llama import LlamaModel
from planner.models import CATALOG, ModelConfig
from planner.plan import Block, Placement, Plan
from planner.planning import Request, make_plan, predict
from planner.profile import profile_model
from runtime.data import TokenData
from runtime.hf import hf_state_from_layers, load_layers_from_hf_state
from runtime.optim import AdamWConfig
from runtime.trainer import TrainConfig, Trainer

TINY = CATALOG["tiny"]   # 4 decoder layers: plan layers 0 (embedding) .. 5 (head)


@functools.lru_cache(maxsize=None)
def _base(cfg: ModelConfig) -> Plan:
    hw = make_hardware(gpu="rtx4090", vram_gib=1, host_ram_gib=8, nvme_gib=10)
    return make_plan(cfg, hw, Request(vram_gib=1, reserve_gib=0.5, seq_len=32, batch=4, micro_batch=2,
                                      steps_per_block=2, time_limit_s=2))


def P(layer: int, w: str, state: str, acts: str) -> Placement:
    """A placement: weights tier, optimizer-state tier (grads follow: on the device with a device state), acts."""
    return Placement(layer=layer, weights=w, master=state, moments=state, grads="gpu" if state == "gpu" else "cpu",
                     activations=acts)


def tiny_plan(placements=None, *, cfg: ModelConfig = TINY, blocks=((0, 1), (2, 3), (4, 5)), order="ascending",
              switch_state="reset", method="bcd", steps_per_block=2, profile=None) -> Plan:
    """A plan for `cfg` with the given options; `predicted` recomputed from `profile` (default: the bf16 one)."""
    base = _base(cfg)
    n = cfg.layers + 2
    placements = placements or [P(i, "gpu", "gpu", "gpu") for i in range(n)]
    if method == "full":
        blocks = ((0, n - 1),)
    plan = dataclasses.replace(base, placements=tuple(placements), order=order, switch_state=switch_state,
                               method=method, steps_per_block=steps_per_block,
                               blocks=tuple(Block(first=a, last=b) for a, b in blocks))
    return dataclasses.replace(plan, predicted=predict(plan, profile or profile_model(cfg)))


def write_tokens(path, n: int = 20000, seed: int = 0, vocab: int = 256) -> str:
    np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16).tofile(path)
    return str(path)


def train(plan: Plan, data_path: str, tc: TrainConfig, steps: int | None = None):
    """(losses, initial weights, final weights, trainer) of a runtime run on the CPU; the trainer is closed."""
    data = TokenData.open(data_path, seq_len=plan.shape.seq_len, seed=0)
    tr = Trainer(plan, data, dataclasses.replace(tc, force_cpu=True))
    try:
        init = tr.weights()
        losses = [tr.step()["loss"] for _ in range(steps or tc.steps)]
        return losses, init, tr.weights(), tr
    finally:
        tr.close()


def reference_lr(step: int, tc: TrainConfig) -> float:
    """The learning rate of (0-based) step `step`, written out here rather than imported from the runtime: linear
    warmup that reaches tc.lr at step warmup-1 (step 0 trains at lr/warmup, not at 0), then a half cosine from
    tc.lr at step `warmup` to tc.min_lr at step tc.steps, flat after."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.min_lr + (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * t)) / 2


def reference_bcd(plan: Plan, init: dict, data_path: str, tc: TrainConfig, steps: int):
    """The plain PyTorch BCD loop; returns (losses, final weights under HF names)."""
    cfg = plan.model
    model = LlamaModel(cfg)
    load_layers_from_hf_state(model.layers, init, cfg)
    model.requires_grad_(False)
    data = TokenData.open(data_path, seq_len=plan.shape.seq_len, seed=0)
    g, mb, nb, spb = plan.shape.grad_accum, plan.shape.micro_batch, len(plan.blocks), plan.steps_per_block
    a = tc.adamw
    kept, active, params, opt, losses = {}, None, [], None, []
    for s in range(steps):
        cycle, in_cycle = divmod(s, spb * nb)
        block = plan.block_order(cycle)[in_cycle // spb]
        if active is None or (s % spb == 0 and nb > 1):
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            head = cfg.layers + 1
            params = [p for i in plan.blocks[block].layers for name, p in model.layers[i].named_parameters()
                      if not (cfg.tie_embeddings and i == head and name == "lm_head.weight")]
            for p in params:
                p.requires_grad_(True)
            new = functools.partial(torch.optim.AdamW, params, lr=tc.lr, betas=(a.beta1, a.beta2), eps=a.eps,
                                    weight_decay=a.weight_decay)
            opt = new() if plan.switch_state == "reset" else kept.setdefault(block, new())
            active = block
        for group in opt.param_groups:
            group["lr"] = reference_lr(s, tc)
        total = torch.zeros(())
        for _ in range(g):
            x, y = data.next_batch(mb)
            loss = model(x, y) / g
            loss.backward()
            total += loss.detach()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total.item())
    return losses, {k: v.clone() for k, v in hf_state_from_layers(model.layers, cfg).items()}


TC = TrainConfig(steps=12, lr=1e-2, min_lr=1e-3, warmup=2, quiet=True,
                 adamw=AdamWConfig(weight_decay=0.1, clip=0.5))

# Four plans that, together, use every option at least once (and most of them inside one block).
CASES = {
    "tiers-ascending-reset": dict(placements=[P(0, "gpu", "gpu", "gpu"), P(1, "cpu", "cpu", "cpu"),
                                              P(2, "nvme", "nvme", "recompute"), P(3, "gpu", "cpu", "recompute"),
                                              P(4, "nvme", "gpu", "cpu"), P(5, "cpu", "nvme", "gpu")]),
    "descending-keep_cpu": dict(placements=[P(0, "nvme", "cpu", "recompute"), P(1, "gpu", "nvme", "cpu"),
                                            P(2, "cpu", "gpu", "gpu"), P(3, "nvme", "gpu", "recompute"),
                                            P(4, "gpu", "nvme", "gpu"), P(5, "gpu", "cpu", "cpu")],
                                order="descending", switch_state="keep_cpu", blocks=((0, 2), (3, 3), (4, 5))),
    "random-keep_nvme": dict(placements=[P(0, "cpu", "gpu", "gpu"), P(1, "nvme", "gpu", "recompute"),
                                         P(2, "gpu", "cpu", "cpu"), P(3, "cpu", "nvme", "gpu"),
                                         P(4, "gpu", "gpu", "recompute"), P(5, "nvme", "cpu", "recompute")],
                             order="random", switch_state="keep_nvme", steps_per_block=1,
                             blocks=((0, 0), (1, 2), (3, 4), (5, 5))),
    "full": dict(placements=[P(0, "gpu", "cpu", "gpu"), P(1, "nvme", "nvme", "cpu"), P(2, "cpu", "gpu", "recompute"),
                             P(3, "gpu", "gpu", "cpu"), P(4, "cpu", "cpu", "gpu"), P(5, "gpu", "gpu", "recompute")],
                 method="full"),
}


def test_reference_lr_schedule_by_hand():
    """TC: lr 1e-2, min_lr 1e-3, warmup 2 of 12 steps; the cosine's midpoint is step 7."""
    lrs = [reference_lr(s, TC) for s in range(13)]
    assert lrs[:3] == pytest.approx([5e-3, 1e-2, 1e-2], rel=1e-12)
    assert lrs[7] == pytest.approx(5.5e-3, rel=1e-12) and lrs[12] == pytest.approx(1e-3, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_equals_plain_pytorch_bcd_bitwise(tmp_path, case):
    plan = tiny_plan(**CASES[case])
    data = write_tokens(tmp_path / "tokens.bin")
    tc = dataclasses.replace(TC, nvme_dir=str(tmp_path / "nvme"))
    losses, init, final, _ = train(plan, data, tc)
    ref_losses, ref_final = reference_bcd(plan, init, data, tc, tc.steps)
    assert losses == ref_losses
    assert final.keys() == ref_final.keys()
    assert all(torch.equal(final[k], ref_final[k]) for k in final), \
        [k for k in final if not torch.equal(final[k], ref_final[k])]
    assert any(not torch.equal(final[k], init[k]) for k in final)  # training changed something


def test_switch_policies_differ_and_keeps_agree(tmp_path):
    """keep_cpu and keep_nvme carry the same state across switches (same numbers); reset does not."""
    data = write_tokens(tmp_path / "tokens.bin")
    tc = dataclasses.replace(TC, nvme_dir=str(tmp_path / "nvme"), steps=8)
    runs = {s: train(tiny_plan(switch_state=s, steps_per_block=1, blocks=((0, 2), (3, 5))), data, tc)[0]
            for s in ("reset", "keep_cpu", "keep_nvme")}
    assert runs["keep_cpu"] == runs["keep_nvme"]
    assert runs["reset"][:3] == runs["keep_cpu"][:3]   # the first return to block 0 is step 3
    assert runs["reset"][3:] != runs["keep_cpu"][3:]


HF_CASES = {
    # every tier in the blocks, embedding and head trained too
    "llama": (dict(arch="llama"), [P(0, "gpu", "gpu", "gpu"), P(1, "nvme", "cpu", "recompute"),
                                   P(2, "cpu", "gpu", "cpu"), P(3, "gpu", "nvme", "gpu")], ((0, 1), (2, 3))),
    # tied embeddings (Qwen2 0.5B-3B): the embedding and the head frozen, their two copies on different tiers
    "qwen2-tied": (dict(arch="qwen2", attention_bias=True, tie_embeddings=True),
                   [P(0, "cpu", "gpu", "gpu"), P(1, "nvme", "cpu", "recompute"), P(2, "gpu", "gpu", "cpu"),
                    P(3, "gpu", "gpu", "gpu")], ((1, 1), (2, 2))),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_a_transformers_model_trains_under_a_plan(tmp_path, case):
    """A tiny transformers model saved with save_pretrained starts a run with --init-from: the first step's loss
    is transformers' own loss on the same batches, the run trains, and its checkpoint loads back in transformers
    (a tied matrix still tied, and unchanged: frozen)."""
    transformers = pytest.importorskip("transformers")
    from planner.models import load_model_config
    from planner.plan import write_atomic
    from runtime.hf import build_hf_model
    from tools.cli import run as cli

    extra, placements, blocks = HF_CASES[case]
    cfg = ModelConfig(name="hf-tiny", hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, vocab=256, max_seq=64,
                      **extra)
    torch.manual_seed(0)
    hf = build_hf_model(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = load_model_config(str(tmp_path / "hf"))   # the shape as the checkpoint's config.json says
    assert cfg.tie_embeddings == extra.get("tie_embeddings", False)
    plan = tiny_plan(placements, cfg=cfg, blocks=blocks)
    write_atomic(str(tmp_path / "plan.json"), plan.to_json())
    data = write_tokens(tmp_path / "tokens.bin")
    metrics = tmp_path / "m.jsonl"
    assert cli(["train", "--plan", str(tmp_path / "plan.json"), "--data", data, "--steps", "4", "--cpu", "--quiet",
                "--init-from", str(tmp_path / "hf"), "--nvme-dir", str(tmp_path / "nvme"), "--lr", "1e-2",
                "--metrics", str(metrics), "--ckpt-dir", str(tmp_path / "ck")]) == 0
    import json
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]

    batches = TokenData.open(data, seq_len=plan.shape.seq_len, seed=0)
    want = 0.0
    with torch.no_grad():
        for _ in range(plan.shape.grad_accum):
            x, y = batches.next_batch(plan.shape.micro_batch)
            logits = hf(input_ids=x).logits.float()
            want += torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1)).item()
    want /= plan.shape.grad_accum
    assert abs(losses[0] - want) < 1e-5
    assert len(losses) == 4 and losses[-1] != losses[0]
    # the checkpoint it wrote loads back into transformers, trained
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck" / "step-000004"),
                                                                local_files_only=True)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight)
    if cfg.tie_embeddings:
        assert trained.lm_head.weight.data_ptr() == trained.model.embed_tokens.weight.data_ptr()
        assert torch.equal(trained.model.embed_tokens.weight, hf.model.embed_tokens.weight)
