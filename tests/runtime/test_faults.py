"""A trainer that never trains on, or resumes from, bad numbers or bad files, and loses nothing on a fault.

Each test reproduces a defect of issue 9 (sections 2-4) through the command line, in process: the AdamW knobs
and the data order (checked against the plain PyTorch loop and against the token file itself), a NaN loss or
gradient (stop with exit 3, or skip), a flipped bit or a zeroed 4 KiB block in a checkpoint file, settings or data
changed on resume, a full disk under --ckpt-dir or --nvme-dir (simulated ENOSPC), NVMe scratch files deleted or
truncated mid-run, a bad --ckpt-dir, two trainers on one directory, and a killed run's scratch left behind.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import threading

import numpy as np
import pytest
import torch

from planner.plan import write_atomic
from runtime import checkpoint as ckmod
from runtime import guards
from runtime.checkpoint import load_checkpoint
from runtime.data import TokenData
from runtime.optim import AdamWConfig, BlockOptimizer
from runtime.scratch import reclaim_scratch
from runtime.trainer import Trainer
from tools.cli import run as cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import CASES, TC, reference_bcd, tiny_plan, train, write_tokens  # noqa: E402


@pytest.fixture
def setup(tmp_path):
    """A tiny plan with weights and optimizer state on every tier, NVMe included; 2 steps per block."""
    write_atomic(str(tmp_path / "plan.json"), tiny_plan(**CASES["tiers-ascending-reset"]).to_json())
    write_tokens(tmp_path / "tokens.bin")
    return tmp_path


def _args(tmp, *extra, steps=4, ck="ck"):
    return ["train", "--plan", str(tmp / "plan.json"), "--data", str(tmp / "tokens.bin"), "--cpu", "--quiet",
            "--steps", str(steps), "--ckpt-dir", str(tmp / ck), "--nvme-dir", str(tmp / "nvme"), "--lr", "1e-2",
            "--metrics", str(tmp / "m.jsonl"), *extra]


def _fails(capsys, args, code, *phrases):
    assert cli(args) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for p in phrases:
        assert p in err, err
    return err


def _finite(ck) -> bool:
    return all(bool(torch.isfinite(t).all()) for d in (ck.weights, ck.optimizer) for t in d.values())


# -- section 2: knobs -----------------------------------------------------------------------------------------

def test_betas_and_eps_reach_adamw_bitwise(tmp_path):
    """--beta1/--beta2/--eps: the runtime equals torch.optim.AdamW with the same betas and eps, bitwise, and the
    run differs from one with the defaults (so the knobs are not ignored)."""
    plan = tiny_plan(**CASES["tiers-ascending-reset"])
    data = write_tokens(tmp_path / "t.bin")
    tc = dataclasses.replace(TC, steps=6, nvme_dir=str(tmp_path / "nvme"),
                             adamw=AdamWConfig(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, clip=0.5))
    losses, init, final, _ = train(plan, data, tc)
    ref_losses, ref_final = reference_bcd(plan, init, data, tc, tc.steps)
    assert losses == ref_losses and all(torch.equal(final[k], ref_final[k]) for k in ref_final)
    default_losses = train(plan, data, dataclasses.replace(tc, adamw=AdamWConfig(weight_decay=0.05, clip=0.5)))[0]
    assert default_losses[2:] != losses[2:]


def test_sequential_order_serves_windows_of_seq_plus_one_in_file_order(tmp_path):
    tokens = np.arange(10 * 9 + 5, dtype=np.uint16)        # 10 windows of seq 8 + 1, and a 5-token tail
    tokens.tofile(tmp_path / "t.bin")
    d = TokenData.open(str(tmp_path / "t.bin"), seq_len=8, seed=3, order="sequential")
    rows = []
    for _ in range(6):                                      # 12 windows: the whole epoch, then wraps
        x, y = d.next_batch(2)
        rows += [(a.tolist(), b.tolist()) for a, b in zip(x, y)]
    for k, (x, y) in enumerate(rows):
        start = (k % 10) * 9
        assert x == list(range(start, start + 8)) and y == list(range(start + 1, start + 9))


@pytest.mark.parametrize("flags,phrase", [
    (["--weight-decay", "inf"], "--weight-decay"), (["--weight-decay", "1e30"], "lr x weight decay"),
    (["--weight-decay", "-0.1"], "--weight-decay"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--lr", "-1"], "--lr"), (["--beta1", "1"], "--beta1"), (["--beta2", "-0.5"], "--beta2"),
    (["--beta2", "nan"], "--beta2"), (["--eps", "0"], "--eps"), (["--eps", "-1e-8"], "--eps"),
    (["--clip", "inf"], "--clip"), (["--min-lr", "nan"], "--min-lr"), (["--seed", "-1"], "--seed"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite"), (["--data-order", "random"], "--data-order")])
def test_absurd_optimizer_flags_exit_2(setup, capsys, flags, phrase):
    assert cli(_args(setup, *flags)) == 2
    assert phrase in capsys.readouterr().err
    assert not (setup / "ck").exists()


# -- section 3: NaN/inf -----------------------------------------------------------------------------------------

@pytest.fixture
def poison(monkeypatch):
    """poison(steps): from then on, the gradients of those (1-based) steps hold a NaN."""
    bad, now = set(), [0]
    step, clip = Trainer.step, BlockOptimizer.clip

    def counted(self):
        now[0] = self.step_index + 1
        return step(self)

    def poisoned(self, block_grads):
        def grads():
            out = block_grads()
            if now[0] in bad:
                out[0][0].view(-1)[0] = float("nan")
            return out
        return clip(self, grads)

    monkeypatch.setattr(Trainer, "step", counted)
    monkeypatch.setattr(BlockOptimizer, "clip", poisoned)
    return bad.update


def test_nan_gradient_stops_with_exit_3_and_keeps_the_last_good_checkpoint(setup, capsys, poison):
    poison({3})
    err = _fails(capsys, _args(setup, "--ckpt-every", "2", steps=6), 3, "step 3", "step-000002", "--skip-nonfinite")
    assert "nan" in err
    ck = load_checkpoint(str(setup / "ck"))
    assert ck.step == 2 and _finite(ck)
    assert sorted(n for n in os.listdir(setup / "ck") if n.startswith("step-")) == ["step-000002"]


def test_skip_nonfinite_skips_the_update_and_counts_it(setup, capsys, poison):
    poison({3})
    args = _args(setup, "--ckpt-every", "2", "--skip-nonfinite", "1", "--summary", str(setup / "s.json"), steps=3)
    assert cli(args) == 0
    recs = [json.loads(line) for line in (setup / "m.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, False, True] and math.isnan(recs[2]["grad_norm"])
    assert json.loads((setup / "s.json").read_text())["skipped_steps"] == 1
    # the skipped step changed no weight: step 3's checkpoint holds step 2's weights, bitwise
    two, three = (load_checkpoint(str(setup / "ck" / f"step-00000{s}")) for s in (2, 3))
    assert all(torch.equal(two.weights[k], three.weights[k]) for k in two.weights) and _finite(three)


def test_skip_nonfinite_stops_after_n_in_a_row(setup, capsys, poison):
    poison({2, 3, 4})
    _fails(capsys, _args(setup, "--skip-nonfinite", "2", steps=6), 3, "3th non-finite step in a row")
    assert not (setup / "ck").exists() or not [n for n in os.listdir(setup / "ck") if n.startswith("step-")]


def test_nan_weights_from_init_from_stop_at_step_1_through_the_real_loss(setup, capsys):
    """No monkeypatching: a NaN in the starting weights makes the forward's loss NaN; the run stops with exit 3
    before any update and writes no checkpoint."""
    from safetensors.torch import load_file, save_file
    assert cli(_args(setup, steps=2, ck="src")) == 0
    src, init = setup / "src" / "step-000002", setup / "init"
    init.mkdir()
    shutil.copy(src / "config.json", init / "config.json")
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(init / "model.safetensors"))
    _fails(capsys, _args(setup, "--init-from", str(init), steps=4), 3, "the loss is nan", "step 1",
           "holds no earlier checkpoint")
    assert not [n for n in os.listdir(setup / "ck") if n.startswith("step-")]


# -- section 3: checkpoint integrity ------------------------------------------------------------------------

def _two_checkpoints(setup):
    assert cli(_args(setup, "--ckpt-every", "2", steps=4)) == 0
    assert sorted(n for n in os.listdir(setup / "ck") if n.startswith("step-")) == ["step-000002", "step-000004"]
    return setup / "ck" / "step-000004"


@pytest.mark.parametrize("name,damage", [("model.safetensors", "bit"), ("model.safetensors", "block"),
                                         ("optimizer.safetensors", "bit"), ("optimizer.safetensors", "block")])
def test_a_flipped_bit_or_zeroed_block_is_refused_naming_the_file_and_the_intact_one(setup, capsys, name, damage):
    path = _two_checkpoints(setup) / name
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "bit":
            f.seek(size - 100)
            byte = f.read(1)[0]
            f.seek(size - 100)
            f.write(bytes([byte ^ 0x10]))
        else:
            f.seek(size - 8192)
            f.write(bytes(4096))
    assert os.path.getsize(path) == size
    _fails(capsys, _args(setup, "--resume", steps=6), 2, name, "unreadable or corrupt",
           f"'{setup / 'ck' / 'step-000002'}' is intact")
    assert cli(_args(setup, "--resume", str(setup / "ck" / "step-000002"), steps=6)) == 0


def test_a_damaged_only_checkpoint_says_no_older_one_is_kept(setup, capsys):
    assert cli(_args(setup, steps=2)) == 0
    path = setup / "ck" / "step-000002" / "model.safetensors"
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4096)
        f.write(bytes(4096))
    _fails(capsys, _args(setup, "--resume", steps=4), 2, "no older checkpoint is kept")


# -- section 3: resume refuses what changed ---------------------------------------------------------------

@pytest.mark.parametrize("flags,phrase", [
    (["--lr", "2e-2"], "--lr 0.01 -> 0.02"), (["--warmup", "1"], "--warmup"),
    (["--weight-decay", "0.01"], "--weight-decay"), (["--beta2", "0.999"], "--beta2"), (["--eps", "1e-6"], "--eps"),
    (["--data-order", "sequential"], "--data-order"), ("data", "--data (its contents differ")])
def test_resume_refuses_changed_settings_unless_allowed(setup, capsys, flags, phrase):
    assert cli(_args(setup, steps=2)) == 0
    if flags == "data":   # another file of the same length
        write_tokens(setup / "tokens.bin", seed=1)
        flags = []
    _fails(capsys, _args(setup, "--resume", *flags, steps=4), 2, phrase, "--allow-changes")
    assert cli(_args(setup, "--resume", "--allow-changes", *flags, steps=4)) == 0
    assert load_checkpoint(str(setup / "ck")).step == 4


@pytest.mark.parametrize("steps", [2, 1])
def test_resume_with_steps_not_beyond_the_checkpoint_says_so(setup, capsys, steps):
    assert cli(_args(setup, steps=2)) == 0
    _fails(capsys, _args(setup, "--resume", steps=steps), 2, "is at step 2", "nothing to train")


# -- section 4: faults ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(setup, capsys, monkeypatch, kind):
    write = ckmod.save_file
    calls = [0]

    def full(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] > 2:   # the second checkpoint's first file: half written, then the disk is full
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
            if kind == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise ckmod.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                        "message: \"No space left on device\" })")
        return write(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckmod, "save_file", full)
    _fails(capsys, _args(setup, "--ckpt-every", "2", steps=4), 2, "could not write checkpoint 4",
           "No space left on device", "step-000002' is intact")
    assert not [n for n in os.listdir(setup / "ck") if n.startswith(".tmp-")]   # the space was given back
    assert load_checkpoint(str(setup / "ck")).step == 2


def test_disk_full_on_nvme_from_a_worker_thread_is_one_paragraph(setup, capsys, monkeypatch):
    pwrite, calls = os.pwrite, []

    def full(fd, data, offset):  # the disk fills when the copy engine's NVMe writer thread writes
        if "nvme_write" in threading.current_thread().name:
            calls.append(threading.current_thread().name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    assert cli(_args(setup, steps=2, ck="ck0")) == 0  # a checkpoint to keep
    monkeypatch.setattr(os, "pwrite", full)
    _fails(capsys, _args(setup, "--resume", str(setup / "ck0"), steps=6, ck="ck0"), 2, "drive is full",
           "NVMe scratch file")
    monkeypatch.undo()
    assert calls   # it was the worker thread's error that reached the command line
    assert load_checkpoint(str(setup / "ck0")).step == 2
    assert not os.listdir(setup / "nvme")   # the run's scratch went with it


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_scratch_file_deleted_or_truncated_mid_run(setup, capsys, monkeypatch, how):
    step = Trainer.step

    def vandal(self):
        if self.step_index == 1:
            (root,) = os.listdir(setup / "nvme")
            path = setup / "nvme" / root / "weights-L2.bin"
            if how == "delete":
                os.unlink(path)
            else:
                os.truncate(path, os.path.getsize(path) // 2)
        return step(self)

    monkeypatch.setattr(Trainer, "step", vandal)
    _fails(capsys, _args(setup, steps=4), 2, "weights-L2.bin", "deleted or truncated")


@pytest.mark.parametrize("kind", ["file", "fifo", "under-a-file"])
def test_a_bad_ckpt_dir_is_refused_before_step_1(setup, capsys, kind):
    target = setup / "ck"
    if kind == "file":
        target.write_text("x")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        (setup / "f").write_text("x")
        target = setup / "f" / "ck"
    args = _args(setup, steps=4)
    args[args.index("--ckpt-dir") + 1] = str(target)
    said = {"file": "is a file", "fifo": "is a FIFO", "under-a-file": "lies under"}[kind]
    _fails(capsys, args, 2, "--ckpt-dir", said)
    assert not (setup / "m.jsonl").exists()


def test_ckpt_dir_without_room_for_the_checkpoints_is_refused(tmp_path, capsys, monkeypatch):
    write_atomic(str(tmp_path / "plan.json"), tiny_plan().to_json())   # every tier on the device: no NVMe check
    write_tokens(tmp_path / "tokens.bin")
    free = guards.psutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(guards.psutil, "disk_usage", lambda p: free._replace(free=1 << 20))
    # 1 MiB free, in a unit that shows it (not "0.00 GiB free")
    _fails(capsys, _args(tmp_path, steps=4), 2, "--ckpt-dir", "has 1.00 MiB free, but the run's checkpoints need")


def test_a_second_trainer_on_one_ckpt_dir_is_refused(setup, capsys):
    lock = guards.DirLock(str(setup / "ck"))    # a live trainer holds it
    try:
        _fails(capsys, _args(setup, steps=2), 2, "in use by another trainer", f"pid {os.getpid()}")
    finally:
        lock.release()
    assert cli(_args(setup, steps=2)) == 0


def test_a_dead_runs_scratch_is_reclaimed_and_a_live_ones_kept(setup, capsys, monkeypatch):
    nvme = setup / "nvme"
    dead, live = nvme / "blockfit-4242-dead", nvme / "blockfit-4243-live"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "weights-L2.bin").write_bytes(bytes(1 << 20))
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # as a running trainer holds its own
    try:
        # the disk has room only once the dead run's megabyte is back
        real = guards.psutil.disk_usage
        monkeypatch.setattr(guards.psutil, "disk_usage",
                            lambda p: real(p)._replace(free=(10**12 if not dead.exists() else 0)))
        assert cli(_args(setup, steps=2)) == 0
        assert not dead.exists() and live.exists()
        assert reclaim_scratch(str(nvme)) == 0 and live.exists()
    finally:
        os.close(fd)
    assert reclaim_scratch(str(nvme)) == 1 << 20 and not live.exists()


@pytest.fixture
def small_fs(tmp_path):
    """A real 24 MiB tmpfs (root only; skipped elsewhere): the disk-full tests above, with the kernel's ENOSPC."""
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("where", ["ckpt", "nvme"])
def test_a_real_full_filesystem_mid_run(setup, capsys, monkeypatch, small_fs, where):
    """--ckpt-dir or --nvme-dir on a small tmpfs that a filler fills after step 2: one paragraph, exit 2, the
    step-2 checkpoint intact and verified."""
    step = Trainer.step

    def fill(self):
        if self.step_index == 2:
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            with open(small_fs / "filler", "wb") as f:
                f.write(bytes(max(0, free - 4096)))
        return step(self)

    monkeypatch.setattr(Trainer, "step", fill)
    args = _args(setup, "--ckpt-every", "2", steps=6)
    if where == "ckpt":
        args[args.index("--ckpt-dir") + 1] = str(small_fs / "ck")
    else:
        args[args.index("--nvme-dir") + 1] = str(small_fs / "nvme")
    err = _fails(capsys, args, 2, "No space left on device" if where == "ckpt" else "drive is full")
    assert "intact" in err
    ck = load_checkpoint(str(small_fs / "ck" if where == "ckpt" else setup / "ck"))
    assert ck.step == 2 and _finite(ck)


@pytest.mark.parametrize("have", [0, 1, 2])
@pytest.mark.parametrize("saves", [1, 2, 3, 5])
def test_ckpt_dir_space_is_what_the_saves_and_pruning_need(tmp_path, monkeypatch, have, saves):
    """Reference: play the saves (write a new directory, then prune to KEEP) and count the most directories
    that exist beyond those already there; the check must ask for exactly that many checkpoints of space."""
    dirs, peak = list(range(have)), have
    for s in range(saves):
        dirs.append(100 + s)
        peak = max(peak, len(dirs))
        dirs = dirs[-ckmod.KEEP:]
    want = peak - have
    ck = tmp_path / "ck"
    ck.mkdir()
    for i in range(have):
        (ck / f"step-{i:06d}").mkdir()
    size = 10 << 20
    free = guards.psutil.disk_usage(str(tmp_path))
    for room in (want, want - 1):
        monkeypatch.setattr(guards.psutil, "disk_usage", lambda p, r=room: free._replace(free=r * size))
        if room >= want:
            guards.check_ckpt_dir(str(ck), size, saves)
        else:
            with pytest.raises(guards.UserError, match=r"has [0-9.]+ (B|KiB|MiB|GiB|TiB) free"):
                guards.check_ckpt_dir(str(ck), size, saves)
