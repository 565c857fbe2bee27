"""Checkpoints that survive a crash at any instant, written by one rank or by all the ranks of a world.

Layout: ckpt_dir/step-000123/{model.safetensors, optimizer.safetensors, meta.json} plus ckpt_dir/latest, a one-line
file naming the newest step directory. A save writes everything into a hidden temporary directory, fsyncs each
file and the directory, and only then renames it to step-NNNNNN; `latest` moves by temp file + os.replace. Both
renames are atomic on POSIX, so at every instant `latest` names a complete checkpoint and a step-* directory is
either complete or absent: a process killed mid-save leaves the previous checkpoint to resume from and a
.tmp-* directory that loads ignore and the next save removes.

meta.json records the size and sha256 of every tensor file; a load verifies them, so a flipped bit or a zeroed
block on the disk is refused (naming the file, and the older checkpoint that is intact) instead of resuming into
NaNs or other weights. A save that fails (a full disk) removes its temporary directory and leaves the previous
checkpoint as it was.

A world of N ranks (runtime.dist.World) saves together, in three stages each ended by every rank's agreement
that it succeeded (an all-reduce when torch.distributed is up): rank 0 makes the temporary directory; every rank
writes its files there and fsyncs them; rank 0 writes meta.json, renames and moves `latest`. The weights, the
same on every rank after the gradient all-reduce (or the all-gather of sharded updates), are written once, by
rank 0, under Hugging Face names. The optimizer state is written once too when it is not sharded (every rank's is
the same); under the plan's shard_state each rank writes its own shard (optimizer-rankRRRRR-of-NNNNN.safetensors)
and meta.json records each state's flat length. meta.json holds the world size and every rank's data position
and RNG states, and lists every file's digest (each rank digests its own and hands it to rank 0 in a small file).
A rank of the same world size resumes exactly what it saved; on another world size the optimizer state is
re-cut (runtime.reshard) and the data continue from the global position.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from planner.errors import UserError
from planner.models import ModelConfig
from runtime.ckpt_world import Stage, rank_file, rank_view, saved_world, shard_file
from runtime.dist import SINGLE, World
from runtime.reshard import PARTS, reshard

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_FILE = re.compile(r"^optimizer-rank\d+-of-\d+\.safetensors$")
_TMP_PREFIX = ".tmp-"
_FORMAT = "blockfit-checkpoint/1"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
KEEP = 2   # step directories a save keeps: the newest and the one before, so a damaged newest has a fallback


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    step: int
    path: str                          # the step directory
    weights: dict[str, torch.Tensor]   # CPU tensors, as saved
    optimizer: dict[str, torch.Tensor]  # this rank's optimizer state, in the shards it asked for
    meta: dict                         # what the trainer passed to save_checkpoint, with this rank's data and RNG
    world_size: int = 1                # ranks that saved it
    note: str = ""                     # what a resume on another world size changed, for stderr


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(ckpt_dir: str, step: int, *, weights: dict[str, torch.Tensor],
                    optimizer: dict[str, torch.Tensor], meta: dict, keep: int = KEEP, world: World = SINGLE,
                    shards: int = 1, rank_meta: dict | None = None, flat_numel: dict[str, int] | None = None) -> str:
    """Write one checkpoint atomically, point `latest` at it, keep the newest `keep`; returns its directory.

    meta must be JSON-serialisable (schedule position, plan fingerprint, ...); rank_meta is this rank's own part
    (its data position and RNG states), merged into meta (rank 0's) and, with several ranks, listed per rank
    in meta.json's 'world' record. With world.size > 1 every rank calls this together (see the module docstring):
    `weights` are written by rank 0 only (the others may pass {}); `optimizer` is this rank's shard when
    shards == world.size (the plan's shard_state; flat_numel names each state tensor's unpadded flat length,
    recorded so another world size can re-cut it), or, with shards == 1, the whole state, the same on every rank
    and written by rank 0."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep!r}")
    if shards not in (1, world.size) or (shards > 1 and flat_numel is None):
        raise ValueError(f"optimizer state in {shards} shards on {world.size} ranks (1 or the world size, and "
                         f"sharded state needs flat_numel)")
    meta = {**meta, **(rank_meta or {})}
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta is not JSON-serialisable: {e}") from None
    lead = world.rank == 0
    tmp = os.path.join(ckpt_dir, f"{_TMP_PREFIX}{step_dir_name(step)}-of-{world.size}")  # one name all ranks know
    final = os.path.join(ckpt_dir, step_dir_name(step))
    with Stage(ckpt_dir, step, world, tmp, _previous) as saving:   # 1. rank 0 makes the temporary directory
        if lead:
            os.makedirs(ckpt_dir, exist_ok=True)
            _remove_leftovers(ckpt_dir)
            os.mkdir(tmp)
    with Stage(ckpt_dir, step, world, tmp, _previous) as saving:   # 2. every rank writes and syncs its files
        mine = {}
        if lead:
            mine["model.safetensors"] = _write_tensors(os.path.join(tmp, "model.safetensors"), weights)
        if shards > 1 or lead:
            name = shard_file(world.rank, shards)
            mine[name] = _write_tensors(os.path.join(tmp, name), optimizer)
        if not lead:
            _write_text(os.path.join(tmp, rank_file(world.rank)), json.dumps(
                {"files": mine, "meta": rank_meta or {}}, sort_keys=True, allow_nan=False))
    with Stage(ckpt_dir, step, world, tmp, _previous) as saving:   # 3. rank 0 commits: meta.json, rename, `latest`
        if lead:
            files, ranks = dict(mine), [rank_meta or {}]
            for r in range(1, world.size):
                with open(os.path.join(tmp, rank_file(r)), encoding="utf-8") as f:
                    theirs = json.load(f)
                files.update(theirs["files"])
                ranks.append(theirs["meta"])
                os.remove(os.path.join(tmp, rank_file(r)))
            manifest = {"size": world.size, "optimizer_shards": shards, "optimizer_numel": flat_numel or {},
                        **({"ranks": ranks} if world.size > 1 else {})}
            meta_text = json.dumps({"format": _FORMAT, "step": step, "saved_unix_s": time.time(), "files": files,
                                    "world": manifest, "meta": meta}, indent=1, sort_keys=True, allow_nan=False)
            _write_text(os.path.join(tmp, "meta.json"), meta_text)
            _fsync_dir(tmp)
            replaced = None
            if os.path.exists(final):  # saving a step again (a resumed run): move the old one out of the way
                replaced = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=ckpt_dir)
                os.rename(final, os.path.join(replaced, "old"))
            os.rename(tmp, final)
            saving.committed = True
            _fsync_dir(ckpt_dir)
            if replaced:
                shutil.rmtree(replaced, ignore_errors=True)
            latest_tmp = os.path.join(ckpt_dir, f"{_TMP_PREFIX}latest")
            _write_text(latest_tmp, step_dir_name(step) + "\n")
            os.replace(latest_tmp, os.path.join(ckpt_dir, "latest"))
            _fsync_dir(ckpt_dir)
            _prune(ckpt_dir, keep, protect=step)
    return final


def _previous(ckpt_dir: str) -> str:
    try:
        return f"the previous checkpoint '{resolve_step_dir(ckpt_dir)}' is intact."
    except UserError:
        return "no earlier checkpoint exists there."


def file_digest(path: str) -> dict:
    """{'bytes': size, 'sha256': hex digest} of a file, read in 16 MiB slices."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def damaged_files(step_dir: str, files: dict, names=None) -> list[str]:
    """The tensor files of a step directory (`names`, default: every one its meta.json must list) whose size or
    sha256 differs from what its meta.json recorded."""
    bad = []
    for name in names if names is not None else tensor_files(files):
        want, path = files.get(name), os.path.join(step_dir, name)
        if not isinstance(want, dict):
            bad.append(name)
            continue
        try:
            if os.path.getsize(path) != want.get("bytes") or file_digest(path) != want:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad


def tensor_files(files: dict) -> list[str]:
    """The tensor files a checkpoint holds: the weights, and the optimizer file or its per-rank shards."""
    shards = sorted(n for n in files if _SHARD_FILE.match(n))
    return ["model.safetensors", *(shards or ["optimizer.safetensors"])]


def _intact_older(step_dir: str, step: int) -> str:
    """Words naming the newest older checkpoint beside step_dir whose files verify, for an error message."""
    parent = os.path.dirname(os.path.abspath(step_dir))
    older = [(s, n) for s, n in _step_dirs(parent) if s < step]
    for _, name in reversed(older):
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
                files = json.load(f).get("files")
        except (OSError, ValueError, AttributeError, RecursionError):
            continue
        if isinstance(files, dict) and not damaged_files(path, files):
            return f"the older checkpoint '{path}' is intact: resume from it with --resume {path}"
    if older:
        return "no older checkpoint there verifies either"
    return (f"no older checkpoint is kept beside it (a save keeps the newest {KEEP}; this run has not saved that "
            f"many yet)")


def load_checkpoint(path: str, *, world: World = SINGLE, shards: int = 1) -> Checkpoint:
    """Load a step directory, or the checkpoint a checkpoint directory's `latest` names (else its newest), as
    rank world.rank sees it: its optimizer state in `shards` pieces (1, or world.size under the plan's
    shard_state), its own data position and RNG states in meta['data'] and meta['rng']. A checkpoint saved in
    another number of shards is re-cut (runtime.reshard) and says so in Checkpoint.note."""
    step_dir = resolve_step_dir(path)
    meta_path = os.path.join(step_dir, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UserError(f"checkpoint '{step_dir}' has no meta.json; it is not a complete checkpoint.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"checkpoint '{step_dir}': meta.json is unreadable or corrupt "
                        f"({' '.join(str(e).split())[:200] or type(e).__name__}).") from None
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT or not isinstance(raw.get("step"), int) \
            or isinstance(raw.get("step"), bool) or raw["step"] < 0 or not isinstance(raw.get("meta", {}), dict):
        raise UserError(f"checkpoint '{step_dir}': meta.json is not a {_FORMAT} file (or its step is not a "
                        f"non-negative integer).")
    saved = saved_world(step_dir, raw)
    k = saved["optimizer_shards"]
    mine = [world.rank if k > 1 else 0] if k == shards else list(range(k))  # the optimizer shards to read
    names = ["model.safetensors", *(shard_file(r, k) for r in mine)]
    if "files" in raw:  # checkpoints written before checksums were recorded have none to verify
        files = raw["files"] if isinstance(raw["files"], dict) else {}
        bad = damaged_files(step_dir, files, names)
        if bad:
            raise UserError(f"checkpoint '{step_dir}': {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                            f"unreadable or corrupt: the size or sha256 no longer matches what was recorded when it "
                            f"was saved (a flipped bit, a zeroed block, a truncated or replaced file); "
                            f"{_intact_older(step_dir, raw['step'])}.")
    pieces = [_read_tensors(step_dir, name) for name in names[1:]]
    note = ""
    if k == shards:
        optimizer = pieces[0]
    else:
        numel = saved["optimizer_numel"] if k > 1 else {n: t.numel() // PARTS for n, t in pieces[0].items()}
        try:
            optimizer = reshard(pieces, numel, shards)[world.rank if shards > 1 else 0]
        except (KeyError, ValueError) as e:
            raise UserError(f"checkpoint '{step_dir}': its optimizer shards do not fit together ({e}).") from None
        note = f"optimizer state re-cut from {k} shard{'s' if k > 1 else ''} to {shards} (concatenated, padding " \
               f"dropped, cut again)"
    meta = dict(raw.get("meta") or {})
    note = rank_view(step_dir, meta, saved, world, note)
    return Checkpoint(step=raw["step"], path=step_dir, meta=meta, optimizer=optimizer, world_size=saved["size"],
                      weights=_read_tensors(step_dir, "model.safetensors"), note=note)


def resolve_step_dir(path: str) -> str:
    """The step directory `path` means: itself if it is one, else what its `latest` names (else its newest)."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint '{path}' does not exist." if not os.path.exists(path)
                        else f"checkpoint '{path}' is a file; give a checkpoint or step directory.")
    if os.path.exists(os.path.join(path, "meta.json")) or _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        return path
    latest = os.path.join(path, "latest")
    if os.path.exists(latest):
        try:
            with open(latest, encoding="utf-8") as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"checkpoint directory '{path}': 'latest' is unreadable ({e}).") from None
        if not _STEP_DIR.match(name):
            raise UserError(f"checkpoint directory '{path}': 'latest' holds '{name[:80]}', not a step directory "
                            f"name; give a step directory explicitly.")
        if os.path.isdir(os.path.join(path, name)):
            return os.path.join(path, name)
        # Only a save that re-wrote this very step and died between its two renames leaves `latest` dangling;
        # the newest complete step directory is then the right place to resume.
    steps = _step_dirs(path)
    if not steps:
        raise UserError(f"checkpoint directory '{path}' holds no checkpoint (no 'latest', no step-* directory).")
    return os.path.join(path, steps[-1][1])


def capture_rng() -> dict:
    """Every global RNG's state as JSON-friendly values (byte states as base64), for meta.json."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Put back what capture_rng() saved; CUDA states are restored for the devices both runs have."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), device=i)


def write_hf_config(step_dir: str, cfg: ModelConfig, *, dtype: str = "float32") -> str:
    """config.json for transformers.AutoModelForCausalLM.from_pretrained(step_dir), weights under HF names."""
    from runtime.hf import hf_config_dict  # hf.py owns the ModelConfig -> HF mapping
    path = os.path.join(step_dir, "config.json")
    text = json.dumps(hf_config_dict(cfg, dtype=dtype), indent=2, sort_keys=True) + "\n"
    try:
        _write_text(path + ".tmp", text)
        os.replace(path + ".tmp", path)
        _fsync_dir(step_dir)
    except OSError as e:
        raise UserError(f"could not write '{path}' ({e.strerror or e}).") from None
    return path


# -- files -------------------------------------------------------------------------------------------------------

def _write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> dict:
    plain, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (tied weights); a copy keeps the save from failing.
        key = t.untyped_storage().data_ptr() if t.numel() else None
        plain[name] = t.clone() if key is not None and key in seen else t
        seen.add(key)
    save_file(plain, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return file_digest(path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_tensors(step_dir: str, name: str) -> dict[str, torch.Tensor]:
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{step_dir}' has no {name}; it is not a complete checkpoint.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint '{step_dir}': {name} is unreadable or corrupt ({e}).") from None


def _step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    found = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def _remove_leftovers(ckpt_dir: str) -> None:
    """Temporary directories of saves that died; one trainer writes a checkpoint directory at a time."""
    for name in os.listdir(ckpt_dir):
        if name.startswith(_TMP_PREFIX):
            full = os.path.join(ckpt_dir, name)
            if os.path.isdir(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.remove(full)


def _prune(ckpt_dir: str, keep: int, *, protect: int) -> None:
    steps = [s for s in _step_dirs(ckpt_dir) if s[0] != protect]
    for _, name in steps[:max(0, len(steps) - (keep - 1))]:
        # Rename first so a crash mid-delete never leaves a half-empty step-* directory behind.
        doomed = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}prune-", dir=ckpt_dir)
        os.rename(os.path.join(ckpt_dir, name), os.path.join(doomed, name))
        shutil.rmtree(doomed, ignore_errors=True)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
