"""Resume is exact: 2N steps straight == N steps, stop, resume, N steps (losses, weights, optimizer state), through
the command line; and a process SIGKILLed while writing a checkpoint resumes from the one before."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from planner.plan import write_atomic
from runtime.checkpoint import load_checkpoint
from tools.cli import run as cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import P, tiny_plan, write_tokens  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8

PLACES = [P(0, "gpu", "cpu", "gpu"), P(1, "nvme", "gpu", "cpu"), P(2, "cpu", "nvme", "recompute"),
          P(3, "gpu", "gpu", "gpu"), P(4, "nvme", "cpu", "recompute"), P(5, "cpu", "nvme", "cpu")]
OTHER_TIERS = [P(i, "gpu", "cpu", "gpu") for i in range(6)]   # the same plan on another machine


def _setup(tmp_path, placements=PLACES, name="plan.json"):
    plan = tiny_plan(placements, order="random", switch_state="keep_nvme", steps_per_block=2,
                     blocks=((0, 1), (2, 4), (5, 5)))
    write_atomic(str(tmp_path / name), plan.to_json())
    if not (tmp_path / "tokens.bin").exists():
        write_tokens(tmp_path / "tokens.bin")
    return str(tmp_path / name)


def _args(tmp_path, plan: str, ckpt: str, *extra) -> list[str]:
    return ["train", "--plan", plan, "--data", str(tmp_path / "tokens.bin"), "--steps", str(STEPS), "--cpu",
            "--ckpt-dir", str(tmp_path / ckpt), "--nvme-dir", str(tmp_path / "nvme"), "--lr", "1e-2", "--warmup",
            "2", "--weight-decay", "0.1", "--metrics", str(tmp_path / f"{ckpt}.jsonl"), "--quiet", *extra]


def _losses(path) -> list[float]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    assert cli(_args(tmp, _setup(tmp), "ck")) == 0
    return _losses(tmp / "ck.jsonl"), load_checkpoint(str(tmp / "ck"))


@pytest.mark.parametrize("stop,tiers", [(3, "same"), (4, "same"), (5, "other")])
def test_stop_and_resume_equals_the_straight_run(tmp_path, straight, stop, tiers):
    """Stops mid-phase (3, 5) and at a phase's end (4); the last resumes under other tiers (a new plan for
    another machine: same blocks and shape, other placements), which the state does not care about."""
    want_losses, want = straight
    plan = _setup(tmp_path)
    assert cli(_args(tmp_path, plan, "ck", "--stop-after", str(stop))) == 0
    assert load_checkpoint(str(tmp_path / "ck")).step == stop
    if tiers == "other":
        plan = _setup(tmp_path, OTHER_TIERS, "plan2.json")
    assert cli(_args(tmp_path, plan, "ck", "--resume")) == 0
    got = load_checkpoint(str(tmp_path / "ck"))
    assert got.step == STEPS
    assert _losses(tmp_path / "ck.jsonl") == want_losses
    assert _same(got.weights, want.weights) and _same(got.optimizer, want.optimizer)
    assert got.meta["data"] == want.meta["data"] and got.meta["position"] == want.meta["position"]


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, straight):
    want_losses, want = straight
    plan = _setup(tmp_path)
    mark = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {REPO!r})
        import runtime.checkpoint as ck
        write = ck._write_tensors
        def slow(path, tensors):
            if ".tmp-step-000003-" in path and path.endswith("optimizer.safetensors"):
                open({str(mark)!r}, "w").close()
                time.sleep(120)
            return write(path, tensors)
        ck._write_tensors = slow
        from tools.cli import run
        sys.exit(run({_args(tmp_path, plan, "ck", "--ckpt-every", "1")!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not mark.exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before checkpoint 3"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(str(tmp_path / "ck")).step == 2  # step 3's save never completed
    assert cli(_args(tmp_path, plan, "ck", "--resume")) == 0
    got = load_checkpoint(str(tmp_path / "ck"))
    assert got.step == STEPS and _same(got.weights, want.weights) and _same(got.optimizer, want.optimizer)
    # the killed run logged steps 1..3, the resumed one 3..8: step 3 twice, the same loss both times
    losses = _losses(tmp_path / "ck.jsonl")
    assert losses[:3] == want_losses[:3] and losses[3:] == want_losses[2:]
    assert not [n for n in os.listdir(tmp_path / "ck") if n.startswith(".tmp-")]  # the next save cleaned up


def test_sigint_saves_and_stops_after_the_current_step(tmp_path, straight):
    want_losses, want = straight
    plan = _setup(tmp_path)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from runtime.trainer import Trainer
        step = Trainer.step
        def slow(self):
            out = step(self)
            time.sleep(0.3)   # time for the test to interrupt mid-run
            return out
        Trainer.step = slow
        from tools.cli import run
        sys.exit(run({_args(tmp_path, plan, "ck")!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 60
        metrics = tmp_path / "ck.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, "training ended before step 2"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = load_checkpoint(str(tmp_path / "ck")).step
    assert 2 <= stopped < STEPS and len(_losses(tmp_path / "ck.jsonl")) == stopped
    assert cli(_args(tmp_path, plan, "ck", "--resume")) == 0
    got = load_checkpoint(str(tmp_path / "ck"))
    assert _losses(tmp_path / "ck.jsonl") == want_losses
    assert got.step == STEPS and _same(got.weights, want.weights) and _same(got.optimizer, want.optimizer)
