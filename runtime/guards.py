"""Checks that run before anything is written: each failure is a UserError (the CLI prints it and exits 2).

They cover what would otherwise fail minutes or hours in, or leave a mess behind: a plan made for another
model, an NVMe directory without the space the plan needs, too little host RAM, data shorter than one step, an
unreadable checkpoint, a checkpoint directory that already holds another run, an output directory that does
not exist, and plan options this runtime does not execute.
"""
from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import sys

import psutil

from planner import memory
from planner.costs import layer_sizes
from planner.errors import UserError
from planner.models import load_model_config
from planner.plan import Plan, check_fingerprint
from planner.profile import profile_model
from planner.units import fmt_bytes
from runtime.checkpoint import KEEP, Checkpoint, capture_rng, load_checkpoint, restore_rng
from runtime.data import TokenData
from runtime.dist import SINGLE, World

GIB = 1 << 30


def check_supported(plan: Plan) -> None:
    """Plan options this runtime does not execute. (A tied embedding trains: runtime.model.TiedMatrix.)"""
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
    data.require_windows(plan.shape.micro_batch * plan.shape.grad_accum * plan.shape.gpus)  # the global batch
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
        raise UserError(f"--nvme-dir '{nvme_dir}' has {fmt_bytes(free)} free, but the plan needs "
                        f"{fmt_bytes(need_bytes)} there (weights and optimizer state); free some space or "
                        f"point --nvme-dir at a bigger drive.")


def check_host_ram(need_bytes: int) -> None:
    avail = psutil.virtual_memory().available
    if avail < need_bytes:
        raise UserError(f"this machine has {fmt_bytes(avail)} of host RAM available, but the plan needs "
                        f"{fmt_bytes(need_bytes)} (pinned weights, optimizer state, staging buffers); plan again "
                        f"with --host-ram {avail >> 20}MiB so more goes to NVMe, or free memory.")


def resume_signature(plan: Plan) -> dict:
    """What must not change between a checkpoint and its resume. Tiers may (a plan for another machine): the
    saved weights and optimizer state are tier-agnostic."""
    return {"fingerprint": plan.fingerprint, "method": plan.method, "blocks": [[b.first, b.last] for b in plan.blocks],
            "order": plan.order, "seed": plan.seed, "steps_per_block": plan.steps_per_block,
            "switch_state": plan.switch_state, "micro_batch": plan.shape.micro_batch,
            "seq_len": plan.shape.seq_len, "grad_accum": plan.shape.grad_accum}


RESUME_KEYS = ("plan", "position", "active_block", "optimizer", "data", "rng")


def check_resume(plan: Plan, resume: str | None, ckpt_dir: str | None, world: World = SINGLE) -> Checkpoint | None:
    """The checkpoint to resume from, read and checked, as rank world.rank resumes it (its optimizer shard, re-cut
    when the checkpoint was saved by another number of ranks, which rank 0 says on stderr); or None. A checkpoint
    directory that already holds a run is refused without --resume: a new run would prune its checkpoints."""
    if resume is None:
        if ckpt_dir and os.path.isdir(ckpt_dir) and any(n.startswith("step-") for n in os.listdir(ckpt_dir)):
            raise UserError(f"checkpoint directory '{ckpt_dir}' already holds checkpoints; pass --resume to continue "
                            f"that run, or choose another --ckpt-dir.")
        return None
    path = resume or ckpt_dir
    if not path:
        raise UserError("--resume needs a checkpoint: give its path, or --ckpt-dir holding one.")
    ck = load_checkpoint(path, world=world, shards=memory.state_shards(plan))
    missing = [k for k in RESUME_KEYS if k not in ck.meta]
    if missing:
        raise UserError(f"checkpoint '{ck.path}' was not written by `blockfit train` (its meta.json lacks "
                        f"{', '.join(missing)}); start from its weights with --init-from instead.")
    check_same_plan(plan, ck, world.size)
    check_checkpoint_meta(plan, ck)
    if ck.note and world.leader:
        print(f"resuming: {ck.note}.", file=sys.stderr)
    return ck


def check_same_plan(plan: Plan, ck: Checkpoint, world_size: int | None = None) -> None:
    """The checkpoint was trained under this plan (placements may differ). On another world size (world_size,
    default the plan's) the batch per rank may differ, not the sequences per optimizer step over all ranks."""
    saved, want = ck.meta.get("plan") or {}, resume_signature(plan)
    world_size = world_size or plan.world
    if saved.get("fingerprint") != plan.fingerprint:
        raise UserError(f"checkpoint '{ck.path}' is of another model (fingerprint {saved.get('fingerprint')}, the "
                        f"plan's is {plan.fingerprint}).")
    keys = list(want)
    if ck.world_size != world_size:  # another world size: its batch per rank differs, the global batch may not
        keys = [k for k in keys if k not in ("micro_batch", "grad_accum")]
    diff = [k for k in keys if saved.get(k) != want[k]]
    if ck.world_size != world_size and \
            _sequences(saved, ck.world_size) != _sequences(want, world_size):
        diff.append(f"global batch ({_sequences(saved, ck.world_size)} sequences per step on {ck.world_size} "
                    f"rank{'s' if ck.world_size > 1 else ''}, {_sequences(want, world_size)} on {world_size})")
    if diff:
        raise UserError(f"checkpoint '{ck.path}' was trained under another plan ({', '.join(diff)} differ); resume "
                        f"with the plan it was made with (placements may differ, these may not).")


def _sequences(signature: dict, world: int):
    """Sequences per optimizer step over all ranks, from a resume signature."""
    try:
        return signature["micro_batch"] * signature["grad_accum"] * world
    except (KeyError, TypeError):
        return None


def check_outputs(*paths: str | None) -> None:
    for path in paths:
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UserError(f"cannot write '{path}': its directory does not exist.")


# -- a checkpoint's metadata, and what a resume may change ---------------------------------------------------------

def check_checkpoint_meta(plan: Plan, ck: Checkpoint) -> None:
    """The fields of a checkpoint's meta.json that the trainer acts on, each in range, so a hand-edited or
    damaged file is refused here rather than failing half-way through restoring (active_block 99, a step -5,
    an optimizer entry without its tensor, an RNG state that does not load)."""
    meta, where = ck.meta, f"checkpoint '{ck.path}': meta.json"
    ab = meta.get("active_block")
    if ab is not None and (not _int(ab) or not 0 <= ab < len(plan.blocks)):
        raise UserError(f"{where} names active block {ab!r}; the plan has blocks 0..{len(plan.blocks) - 1}.")
    opt = meta.get("optimizer")
    if not isinstance(opt, dict):
        raise UserError(f"{where}: 'optimizer' must be an object of layer -> state, got {type(opt).__name__}.")
    active = set(plan.blocks[ab].layers) if ab is not None else set()
    for key, info in opt.items():
        if not key.isdigit() or not 0 <= int(key) < plan.n_layers:
            raise UserError(f"{where}: optimizer entry '{key}' is not a layer of the plan (0..{plan.n_layers - 1}).")
        ok = isinstance(info, dict) and _int(info.get("step")) and info["step"] >= 0 \
            and info.get("where") in ("active", "kept")
        if not ok:
            raise UserError(f"{where}: optimizer entry for layer {key} must be {{'step': n >= 0, 'where': 'active' "
                            f"or 'kept'}}, got {info!r}.")
        if info["where"] == "active" and int(key) not in active:
            raise UserError(f"{where}: layer {key} has active optimizer state but is not in active block {ab}.")
        if f"L{key}.state" not in ck.optimizer:
            raise UserError(f"{where} lists optimizer state for layer {key}, but optimizer.safetensors has no "
                            f"tensor 'L{key}.state'; the checkpoint is incomplete.")
    extra = sorted(set(ck.optimizer) - {f"L{k}.state" for k in opt})
    if extra:
        raise UserError(f"checkpoint '{ck.path}': optimizer.safetensors holds {', '.join(extra[:3])}, which "
                        f"meta.json does not list; the files do not belong together.")
    if not isinstance(meta.get("data"), dict):
        raise UserError(f"{where}: 'data' must be an object (epoch, position, seed).")
    pos = meta.get("position")
    if not isinstance(pos, dict) or not _int(pos.get("cycle")) or pos["cycle"] < 0:
        raise UserError(f"{where}: 'position' {pos!r} is not a position in the block schedule.")
    mine = capture_rng()
    try:
        restore_rng(meta.get("rng"))
    except Exception as e:  # any malformed state: wrong types, lengths, base64, torch's own checks
        raise UserError(f"{where}: its RNG state does not load ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}).") from None
    finally:
        restore_rng(mine)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# keys of a checkpoint's "train" record a resume refuses to change, with the flag that sets each
SETTINGS = {"lr": "--lr", "min_lr": "--min-lr", "warmup": "--warmup", "weight_decay": "--weight-decay",
            "beta1": "--beta1", "beta2": "--beta2", "eps": "--eps", "clip": "--clip", "data_order": "--data-order",
            "data_fingerprint": "--data"}


def check_settings(ck: Checkpoint, now: dict, *, steps: int, allow_changes: bool) -> list[str]:
    """A resume continues the same run: refuse (UserError) a change to the optimizer, the LR schedule, the data
    order or the data file's contents (another file of the same length included) unless allow_changes; returns
    the changes allowed, in words. --steps at or below the checkpoint's step is refused: nothing would run."""
    if steps <= ck.step:
        raise UserError(f"checkpoint '{ck.path}' is at step {ck.step}, and --steps {steps} is not beyond it: "
                        f"nothing to train. Give --steps above {ck.step} to continue.")
    saved = ck.meta.get("train") if isinstance(ck.meta.get("train"), dict) else {}
    changed = [f"{flag} {saved[k]!r} -> {now[k]!r}" if k != "data_fingerprint" else
               "--data (its contents differ from the data the checkpoint was trained on)"
               for k, flag in SETTINGS.items() if k in saved and k in now and saved[k] != now[k]]
    if changed and not allow_changes:
        raise UserError(f"checkpoint '{ck.path}' was trained with other settings: {'; '.join(changed)}. A resume "
                        f"continues the same run; pass --allow-changes to resume with the new ones anyway.")
    return changed


# -- the checkpoint directory ---------------------------------------------------------------------------------

def checkpoint_bytes(plan: Plan, layer_params: list[int], weight_bytes: int) -> int:
    """An upper bound on one checkpoint's size: every weight at the runtime's element size, plus fp32 master
    and moments (12 bytes a parameter) for the layers whose state a checkpoint can hold: the largest block's
    under `reset`, every trained layer's when states are kept across switches."""
    from planner.memory import STATE_BYTES
    weights = sum(layer_params) * weight_bytes
    per_block = [sum(layer_params[i] for i in b.layers) for b in plan.blocks]
    state = sum(per_block) if plan.switch_state != "reset" else max(per_block)
    return weights + state * STATE_BYTES + (1 << 20)  # headers and meta.json


def check_ckpt_dir(ckpt_dir: str | None, need_bytes: int, saves: int = KEEP + 1) -> None:
    """Before step 1: --ckpt-dir must be (or be creatable as) a writable directory on a drive with room for the
    checkpoints this run writes: `saves` of them, of which KEEP are kept, each new one written before the oldest
    goes. With E already there, the directory peaks at min(KEEP, E + saves - 1) + 1 step directories."""
    if not ckpt_dir:
        return
    if os.path.exists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        kind = "a FIFO" if stat.S_ISFIFO(os.stat(ckpt_dir).st_mode) else "a file"
        raise UserError(f"--ckpt-dir '{ckpt_dir}' is {kind}, not a directory.")
    base = os.path.abspath(ckpt_dir)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise UserError(f"--ckpt-dir '{ckpt_dir}' lies under '{base}', which is a file, not a directory.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"--ckpt-dir '{ckpt_dir}': '{base}' is not writable.")
    have = _ckpt_dirs(ckpt_dir) if os.path.isdir(ckpt_dir) else 0
    new_dirs = max(1, min(KEEP, have + max(1, saves) - 1) + 1 - have)
    need = need_bytes * new_dirs
    free = psutil.disk_usage(base).free
    if free < need:
        raise UserError(f"--ckpt-dir '{ckpt_dir}' has {fmt_bytes(free)} free, but the run's checkpoints need "
                        f"{fmt_bytes(need)} ({new_dirs} more of {fmt_bytes(need_bytes)} each: {KEEP} are kept "
                        f"and a new one is written before the oldest goes); free some space or choose another "
                        f"directory.")


def _ckpt_dirs(ckpt_dir: str) -> int:
    return sum(1 for n in os.listdir(ckpt_dir) if n.startswith("step-"))


class DirLock:
    """An exclusive lock on a directory (fcntl.flock on its .lock file), held until release() or the process
    ends (the kernel drops it even after kill -9): two trainers on one --ckpt-dir would interleave checkpoints."""

    def __init__(self, path: str, what: str = "--ckpt-dir"):
        try:
            os.makedirs(path, exist_ok=True)
            self.fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use {what} '{path}' ({e.strerror or e}).") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"{what} '{path}' is in use by another trainer (pid {holder}); two runs on one "
                                f"checkpoint directory would overwrite each other's checkpoints. Wait for it, or "
                                f"choose another directory.") from None
            raise UserError(f"cannot lock {what} '{path}' ({e.strerror or e}).") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_finite_flag(flag: str, value, *, lo=None, hi=None, lo_open=False, integer=False) -> None:
    """A number flag must be finite and within [lo, hi] (lo excluded when lo_open); message names the flag."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if ok and integer:
        ok = int(value) == value
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise UserError(f"{flag} must be a finite {'integer' if integer else 'number'} in {rng}, got {value!r}.")
