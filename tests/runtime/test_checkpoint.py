"""runtime/checkpoint.py: bitwise round trips, pruning, RNG capture, and a SIGKILL mid-save losing nothing."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from planner.errors import UserError
from runtime.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 5, generator=g).to(torch.bfloat16),
            "b.weight": torch.randn(7, generator=g),
            "steps": torch.randint(0, 1 << 40, (3,), generator=g),
            "view": torch.randn(6, 6, generator=g).t()}  # not contiguous; saved as its values


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_bitwise(tmp_path):
    weights, opt = _tensors(0), {"exp_avg": torch.randn(4, 5, dtype=torch.float64)}
    meta = {"data": {"epoch": 1, "position": 17}, "plan": "abc123", "loss": 2.5}
    path = save_checkpoint(str(tmp_path), 123, weights=weights, optimizer=opt, meta=meta)
    assert os.path.basename(path) == "step-000123"
    assert (tmp_path / "latest").read_text().strip() == "step-000123"
    for ref in (str(tmp_path), path):
        ck = load_checkpoint(ref)
        assert ck.step == 123 and ck.path == path and ck.meta == meta
        assert _same(ck.weights, weights) and _same(ck.optimizer, opt)


def test_keeps_the_newest_and_resaves_a_step(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, weights=_tensors(step), optimizer={}, meta={"s": step}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-000002", "step-000003"]
    save_checkpoint(str(tmp_path), 3, weights=_tensors(30), optimizer={}, meta={"s": 30}, keep=2)
    ck = load_checkpoint(str(tmp_path))
    assert ck.step == 3 and ck.meta == {"s": 30} and _same(ck.weights, _tensors(30))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-000002", "step-000003"]
    os.remove(tmp_path / "latest")  # without `latest`, the newest step directory
    assert load_checkpoint(str(tmp_path)).step == 3


def test_tied_tensors_save(tmp_path):
    w = torch.randn(8, 4)
    save_checkpoint(str(tmp_path), 0, weights={"embed": w, "lm_head": w}, optimizer={}, meta={})
    ck = load_checkpoint(str(tmp_path))
    assert torch.equal(ck.weights["embed"], w) and torch.equal(ck.weights["lm_head"], w)


_KILLED_SAVE = textwrap.dedent("""
    import os, sys, time, torch
    from runtime.checkpoint import save_checkpoint
    ckpt, kill_at = sys.argv[1], int(sys.argv[2])
    save_checkpoint(ckpt, 1, weights={"w": torch.ones(8)}, optimizer={"m": torch.zeros(8)}, meta={"s": 1})
    calls, real_fsync = [0], os.fsync
    def fsync(fd):
        calls[0] += 1
        if calls[0] == kill_at:  # the parent kills us here, before this fsync
            print("KILL ME", flush=True)
            time.sleep(60)
        real_fsync(fd)
    os.fsync = fsync
    big = {"w": torch.randn(4_000_000)}
    save_checkpoint(ckpt, 2, weights=big, optimizer={"m": torch.randn(1_000_000)}, meta={"s": 2})
    print("FINISHED", flush=True)
""")


# fsync 1: model.safetensors written, not synced; 5: step-000002 renamed into place, `latest` not yet written;
# 6: the new `latest` written to its temp file, not yet moved over the old one.
@pytest.mark.parametrize("kill_at", [1, 5, 6])
def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path, kill_at):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(ckpt), str(kill_at)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert proc.stdout.readline().strip() == "KILL ME"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if kill_at != 5:  # at 5 the temporary directory has just become step-000002
        assert any(name.startswith(".tmp-") for name in os.listdir(ckpt))  # the debris is really there
    ck = load_checkpoint(str(ckpt))
    assert ck.step == 1 and ck.meta == {"s": 1} and torch.equal(ck.weights["w"], torch.ones(8))
    for name in os.listdir(ckpt):  # any step-* directory present is complete
        if name.startswith("step-"):
            assert load_checkpoint(str(ckpt / name)).weights
    assert os.path.isdir(ckpt / "step-000002") == (kill_at >= 5)
    save_checkpoint(str(ckpt), 3, weights={"w": torch.full((8,), 3.0)}, optimizer={}, meta={"s": 3})
    assert load_checkpoint(str(ckpt)).step == 3
    assert not any(name.startswith(".tmp-") for name in os.listdir(ckpt))  # the next save clears the debris


def test_broken_checkpoints_are_user_errors_naming_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path))
    path = save_checkpoint(str(tmp_path), 4, weights=_tensors(0), optimizer={}, meta={})
    model = os.path.join(path, "model.safetensors")
    with open(model, "r+b") as f:
        f.truncate(os.path.getsize(model) // 2)
    with pytest.raises(UserError, match="model.safetensors is unreadable or corrupt") as e:
        load_checkpoint(str(tmp_path))
    assert path in str(e.value)
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write('{"step": 4, "form')
    with pytest.raises(UserError, match="meta.json is unreadable or corrupt"):
        load_checkpoint(path)
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(UserError, match="no meta.json"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(UserError, match="'latest' holds"):
        load_checkpoint(str(tmp_path))


def test_rng_restore_reproduces_draws():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    saved = json.loads(json.dumps(capture_rng()))  # must survive meta.json
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    restore_rng(saved)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4))
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])
    assert random.random() != first[0]  # the states really moved on
