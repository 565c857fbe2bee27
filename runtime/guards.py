"""Checks that run before anything is written: each failure is a UserError (the CLI prints it and exits 2).

They cover what would otherwise fail minutes or hours in, or leave a mess behind: a plan made for another
model, an NVMe directory without the space the plan needs, too little host RAM, data shorter than one step, an
unreadable checkpoint, a checkpoint directory that already holds another run, an output directory that does
not exist, and plan options this runtime does not execute.
"""
from __future__ import annotations

import os

import psutil

from planner import memory
from planner.costs import layer_sizes
from planner.errors import UserError
from planner.models import load_model_config
from planner.plan import Plan, check_fingerprint
from planner.profile import profile_model
from runtime.checkpoint import Checkpoint, load_checkpoint
from runtime.data import TokenData

GIB = 1 << 30


def check_supported(plan: Plan) -> None:
    if plan.model.tie_embeddings:
        head = plan.n_layers - 1
        trained = sorted({i for b in plan.blocks for i in b.layers if i in (0, head)})
        if trained:
            what = " and ".join("the embedding (layer 0)" if i == 0 else f"the head (layer {head})" for i in trained)
            raise UserError(f"model '{plan.model.name}' ties its embedding and lm_head, and this plan trains "
                            f"{what}. Tied weights train here only while both stay frozen, as in BCD, whose blocks "
                            f"hold decoder layers: plan with --method bcd (the default) and keep them out of the "
                            f"blocks.")
    for p in plan.placements:
        if p.master != p.moments:
            raise UserError(f"plan: layer {p.layer} keeps its master weights on '{p.master}' but its moments on "
                            f"'{p.moments}'; this runtime steps AdamW where both live: make them the same tier.")


def check_model(plan: Plan, init_from: str | None) -> None:
    """The plan fingerprint must match the model the weights come from (a config.json beside them)."""
    if init_from is None:
        return
    if not os.path.exists(init_from):
        raise UserError(f"--init-from '{init_from}' does not exist.")
    config = os.path.join(init_from, "config.json") if os.path.isdir(init_from) else None
    if config and os.path.isfile(config):
        check_fingerprint(plan, load_model_config(config))


def check_data(data: TokenData, plan: Plan) -> None:
    data.require_windows(plan.shape.micro_batch * plan.shape.grad_accum)
    data.check_vocab(plan.model.vocab)


def runtime_sizes(plan: Plan, weight_dtype: str) -> list:
    """The plan's layers at its shape, with weights in the runtime's dtype (fp32 on a CPU-only machine)."""
    prof = profile_model(plan.model, dtype=weight_dtype)
    return [layer_sizes(lp, plan.shape.micro_batch, plan.shape.seq_len) for lp in prof.layers]


def nvme_need_bytes(plan: Plan, weight_dtype: str) -> int:
    """The plan's NVMe bytes (planner.memory) with weights at the runtime's dtype."""
    return memory.nvme_bytes(plan, runtime_sizes(plan, weight_dtype))


def host_need_bytes(plan: Plan, weight_dtype: str, *, cuda: bool) -> int:
    """The plan's host RAM (planner.memory) at the runtime's dtype, with the plan's own prefetch window."""
    window = memory.window_layers(plan, runtime_sizes(plan, "bfloat16"))
    return memory.host_bytes(plan, runtime_sizes(plan, weight_dtype), cuda=cuda, window=window)


def ram_need_bytes(plan: Plan, weight_dtype: str, *, cuda: bool) -> int:
    """What the run needs from this machine's RAM: the host tier, and without CUDA also the device's bytes (the
    CPU stands in for the device: its largest phase, predicted at the runtime's dtype)."""
    need = host_need_bytes(plan, weight_dtype, cuda=cuda)
    if not cuda:
        from planner.planning import predict
        window = memory.window_layers(plan, runtime_sizes(plan, "bfloat16"))
        need += predict(plan, profile_model(plan.model, dtype=weight_dtype), window=window).peak_vram_bytes
    return need


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_nvme(plan: Plan, nvme_dir: str | None, need_bytes: int) -> None:
    uses = (any(memory.Tier.NVME in (p.weights, p.master) for p in plan.placements)
            or plan.switch_state == "keep_nvme")
    if not uses:
        return
    if not nvme_dir:
        raise UserError("the plan keeps weights or optimizer state on NVMe; give a directory on the NVMe drive "
                        "with --nvme-dir.")
    if os.path.exists(nvme_dir) and not os.path.isdir(nvme_dir):
        raise UserError(f"--nvme-dir '{nvme_dir}' is a file, not a directory.")
    free = psutil.disk_usage(_existing(nvme_dir)).free
    if free < need_bytes:
        raise UserError(f"--nvme-dir '{nvme_dir}' has {free / GIB:.2f} GiB free, but the plan needs "
                        f"{need_bytes / GIB:.2f} GiB there (weights and optimizer state); free some space or "
                        f"point --nvme-dir at a bigger drive.")


def check_host_ram(need_bytes: int) -> None:
    avail = psutil.virtual_memory().available
    if avail < need_bytes:
        raise UserError(f"this machine has {avail / GIB:.2f} GiB of host RAM available, but the plan needs "
                        f"{need_bytes / GIB:.2f} GiB (pinned weights, optimizer state, staging buffers); plan again "
                        f"with --host-ram {avail / GIB:.0f} so more goes to NVMe, or free memory.")


def resume_signature(plan: Plan) -> dict:
    """What must not change between a checkpoint and its resume. Tiers may (a plan for another machine): the
    saved weights and optimizer state are tier-agnostic."""
    return {"fingerprint": plan.fingerprint, "method": plan.method, "blocks": [[b.first, b.last] for b in plan.blocks],
            "order": plan.order, "seed": plan.seed, "steps_per_block": plan.steps_per_block,
            "switch_state": plan.switch_state, "micro_batch": plan.shape.micro_batch,
            "seq_len": plan.shape.seq_len, "grad_accum": plan.shape.grad_accum}


RESUME_KEYS = ("plan", "position", "active_block", "optimizer", "data", "rng")


def check_resume(plan: Plan, resume: str | None, ckpt_dir: str | None) -> Checkpoint | None:
    """The checkpoint to resume from, read and checked; or None. A checkpoint directory that already holds a
    run is refused without --resume: a new run would prune its checkpoints."""
    if resume is None:
        if ckpt_dir and os.path.isdir(ckpt_dir) and any(n.startswith("step-") for n in os.listdir(ckpt_dir)):
            raise UserError(f"checkpoint directory '{ckpt_dir}' already holds checkpoints; pass --resume to continue "
                            f"that run, or choose another --ckpt-dir.")
        return None
    path = resume or ckpt_dir
    if not path:
        raise UserError("--resume needs a checkpoint: give its path, or --ckpt-dir holding one.")
    ck = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ck.meta]
    if missing:
        raise UserError(f"checkpoint '{ck.path}' was not written by `blockfit train` (its meta.json lacks "
                        f"{', '.join(missing)}); start from its weights with --init-from instead.")
    check_same_plan(plan, ck)
    return ck


def check_same_plan(plan: Plan, ck: Checkpoint) -> None:
    saved, want = ck.meta.get("plan") or {}, resume_signature(plan)
    if saved.get("fingerprint") != plan.fingerprint:
        raise UserError(f"checkpoint '{ck.path}' is of another model (fingerprint {saved.get('fingerprint')}, the "
                        f"plan's is {plan.fingerprint}).")
    diff = [k for k in want if saved.get(k) != want[k]]
    if diff:
        raise UserError(f"checkpoint '{ck.path}' was trained under another plan ({', '.join(diff)} differ); resume "
                        f"with the plan it was made with (placements may differ, these may not).")


def check_outputs(*paths: str | None) -> None:
    for path in paths:
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"cannot write '{path}': its directory does not exist.")
