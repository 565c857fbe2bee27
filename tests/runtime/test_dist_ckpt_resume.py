"""2-rank gloo runs of the trainer on the CPU that save, stop on a signal, die by kill -9 and resume, on 2 ranks,
on 1 and from 1: the final checkpoint's weights and optimizer state, and the losses, are bitwise those of the
uninterrupted run.

Each rank is a process running the Trainer with its World (runtime.dist) over a plan for 2 GPUs of one node: its
cpu- and nvme-tier weights live once in the node's shared host memory and NVMe directory (runtime.nodeshare,
runtime.hostio), and every save is a 2-rank save (runtime.checkpoint). Resuming on another world size (2 -> 1,
1 -> 2) with the optimizer state sharded over the ranks needs data-parallel training (per-rank windows of the
global batch, the reduced gradients, the sharded AdamW); those parts run where that trainer is present and are
skipped otherwise. The reference is one rank with grad_accum 2, which computes bitwise what two ranks with
grad_accum 1 compute over the same global batch when clipping is off (tests/runtime/test_dist.py derives why), so
no tolerance is needed.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from planner.cluster import make_cluster
from planner.plan import Plan, write_atomic
from planner.planning import predict
from planner.profile import profile_model
from runtime.checkpoint import load_checkpoint
from runtime.data import TokenData
from runtime.dist import World
from runtime.optim import BlockOptimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import P, tiny_plan, write_tokens  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, STOP = 6, 3
PLACES = [P(0, "gpu", "gpu", "gpu"), P(1, "cpu", "cpu", "cpu"), P(2, "nvme", "gpu", "recompute"),
          P(3, "gpu", "nvme", "gpu"), P(4, "cpu", "gpu", "cpu"), P(5, "gpu", "cpu", "gpu")]
DATA_PARALLEL = hasattr(TokenData, "next_step") and "shard" in inspect.signature(BlockOptimizer).parameters
needs_dp = pytest.mark.skipif(not DATA_PARALLEL, reason="needs the data-parallel trainer (runtime/reducer.py)")

_RANK = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {here!r})
    from test_dist_ckpt_resume import rank_main
    sys.exit(rank_main(json.loads(sys.argv[1]), int(sys.argv[2])))
""").format(here=os.path.dirname(os.path.abspath(__file__)))


def rank_main(job: dict, rank: int) -> int:
    """One rank of a run (this process, or one started by launch()): train to STEPS, or stop after job['stop']
    steps, saving every job['every'] steps and at the end; resume from the checkpoint when job['resume'].
    Returns the trainer's exit code (130 after SIGINT)."""
    import torch.distributed as tdist

    from planner.plan import load_plan
    from runtime import guards
    from runtime.optim import AdamWConfig
    from runtime.trainer import TrainConfig, Trainer
    n = job["world"]
    # Replicas never synchronise, so they may not share the node's host copy (runtime/hostio.py): one per "node".
    world = World(rank=rank, size=n, local_rank=rank, local_size=n) if DATA_PARALLEL else \
        World(rank=rank, size=n, local_rank=0, local_size=1)
    if n > 1:
        tdist.init_process_group("gloo", init_method="file://" + job["init"], rank=rank, world_size=n)
    plan = load_plan(job["plan"])
    data = TokenData.open(job["data"], seq_len=plan.shape.seq_len, seed=0)
    cfg = TrainConfig(steps=STEPS, lr=1e-2, min_lr=1e-3, warmup=2, quiet=True, force_cpu=True,
                      adamw=AdamWConfig(weight_decay=0.1, clip=0.0), ckpt_dir=job["ckpt"],
                      ckpt_every=job.get("every", 0), stop_after=job.get("stop"), nvme_dir=job["nvme"],
                      metrics_path=f"{job['ckpt']}.rank{rank}.jsonl", track_temporaries=False)
    resume = guards.check_resume(plan, job["ckpt"] if job.get("resume") else None, job["ckpt"], world)
    tr = Trainer(plan, data, cfg, resume=resume, world=world)
    try:
        code = tr.run()
    finally:
        tr.close()
    if n > 1:
        tdist.barrier()
        tdist.destroy_process_group()
    return code


def on_gpus(plan: Plan, gpus: int, *, shard: bool = False, grad_accum: int | None = None) -> Plan:
    """The plan for `gpus` GPUs of one node, its prediction recomputed."""
    shape = dataclasses.replace(plan.shape, gpus=gpus, grad_accum=grad_accum or plan.shape.grad_accum)
    p = dataclasses.replace(plan, cluster=make_cluster(plan.hardware.gpu, gpus=gpus), shard_state=shard, shape=shape)
    return dataclasses.replace(p, predicted=predict(p, profile_model(p.model)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Plans: 'one' for 1 GPU (grad_accum 2); 'two' for 2 GPUs (grad_accum 1: the same global batch) and its
    sharded twin. Without the data-parallel trainer, 2 ranks run the 1-GPU plan as replicas of one run (each
    reads the same windows, nothing is reduced), which still exercises every 2-rank save and resume."""
    tmp = tmp_path_factory.mktemp("dckpt")
    one = tiny_plan(PLACES, blocks=((0, 2), (3, 5)), steps_per_block=2, switch_state="keep_nvme", order="random")
    assert one.shape.grad_accum == 2
    plans = {"one": one, "two": on_gpus(one, 2, grad_accum=1) if DATA_PARALLEL else one,
             "sharded": on_gpus(one, 2, shard=True, grad_accum=1) if DATA_PARALLEL else one}
    for name, plan in plans.items():
        write_atomic(str(tmp / f"{name}.json"), plan.to_json())
    write_tokens(tmp / "tokens.bin")
    return tmp


def job(setup, plan: str, ckpt: str, world: int, **extra) -> dict:
    return {"plan": str(setup / f"{plan}.json"), "data": str(setup / "tokens.bin"), "ckpt": str(setup / ckpt),
            "nvme": str(setup / "nvme"), "init": str(setup / f"{ckpt}.pg{time.monotonic_ns()}"), "world": world,
            **extra}


def launch(setup, plan: str, ckpt: str, world: int, **extra) -> list[subprocess.Popen]:
    spec = json.dumps(job(setup, plan, ckpt, world, **extra))
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", _RANK, spec, str(r)], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def finish(procs, codes=(0,)) -> list[str]:
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode in codes, err[-3000:]
        errs.append(err)
    return errs


def run(setup, plan: str, ckpt: str, world: int, **extra) -> list[str]:
    return finish(launch(setup, plan, ckpt, world, **extra))


def losses(setup, ckpt: str, rank: int = 0) -> list[float]:
    with open(setup / f"{ckpt}.rank{rank}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f]


def same_state(a, b) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
               for x, y in ((a.weights, b.weights), (a.optimizer, b.optimizer)))


@pytest.fixture(scope="module")
def straight(setup):
    """The uninterrupted run, on one rank in this process: two ranks compute it bitwise (as replicas without the
    data-parallel trainer; with it, over the same global batch, sharded or not, with clipping off:
    tests/runtime/test_dist.py), so it is the uninterrupted 2-rank run's result too."""
    rank_main(job(setup, "one", "straight", 1), 0)
    return load_checkpoint(str(setup / "straight"))


def wait_for_checkpoint(setup, ckpt: str, step: int, procs) -> None:
    latest, deadline = setup / ckpt / "latest", time.time() + 120
    while not (latest.exists() and latest.read_text().strip() >= f"step-{step:06d}"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), f"no checkpoint {step}"
        time.sleep(0.05)


def test_a_rank_interrupted_then_killed_resumes_bitwise_on_two_ranks_and_on_one(setup, straight, capfd):
    """SIGINT to rank 1 alone: both ranks stop after the same step, saved (exit 130). Resumed, rank 1 dies by
    kill -9 once a checkpoint is in place; rank 0 stops too (at its next collective). Both resume from `latest`
    and end where the straight run ends; so does one rank resuming the same checkpoint, with the state re-cut
    (where the trainer is data-parallel)."""
    procs = launch(setup, "sharded", "killed", 2, every=1)
    wait_for_checkpoint(setup, "killed", 2, procs)
    procs[1].send_signal(signal.SIGINT)
    finish(procs, codes=(130,))
    stopped = load_checkpoint(str(setup / "killed")).step
    assert 2 <= stopped < STEPS - 1 and losses(setup, "killed") == losses(setup, "straight")[:stopped]

    procs = launch(setup, "sharded", "killed", 2, every=1, resume=True)
    wait_for_checkpoint(setup, "killed", stopped + 1, procs)
    procs[1].send_signal(signal.SIGKILL)
    errs = finish(procs, codes=(1, -signal.SIGKILL))
    assert procs[1].returncode == -signal.SIGKILL and procs[0].returncode == 1
    assert "another rank stopped answering" in errs[0]
    ck = load_checkpoint(str(setup / "killed"), world=World(rank=1, size=2, local_rank=1, local_size=2),
                         shards=2 if DATA_PARALLEL else 1)
    done = ck.step
    assert stopped < done < STEPS and ck.world_size == 2 and not ck.note
    files = sorted(n for n in os.listdir(ck.path) if n.endswith(".safetensors"))
    assert files == ["model.safetensors"] + (["optimizer-rank00000-of-00002.safetensors",
                                              "optimizer-rank00001-of-00002.safetensors"] if DATA_PARALLEL
                                             else ["optimizer.safetensors"])
    shutil.copytree(setup / "killed", setup / "killed-on-one")
    shutil.copy(setup / "killed.rank0.jsonl", setup / "killed-on-one.rank0.jsonl")
    run(setup, "sharded", "killed", 2, resume=True)
    got = load_checkpoint(str(setup / "killed"))
    assert got.step == STEPS and same_state(got, straight)
    assert losses(setup, "killed")[-(STEPS - done):] == losses(setup, "straight")[done:]
    assert not [n for n in os.listdir(setup / "nvme") if n.startswith("blockfit-")]   # every scratch dir is gone
    if not DATA_PARALLEL:
        return
    capfd.readouterr()
    rank_main(job(setup, "one", "killed-on-one", 1, resume=True), 0)   # 2 -> 1, in this process
    assert "saved by 2 ranks and resumes on 1: optimizer state re-cut from 2 shards to 1" in capfd.readouterr().err
    got = load_checkpoint(str(setup / "killed-on-one"))
    assert got.step == STEPS and same_state(got, straight)
    assert losses(setup, "killed-on-one")[-(STEPS - done):] == losses(setup, "straight")[done:]


@needs_dp
def test_one_rank_resumed_on_two_recuts_the_state(setup, straight):
    """1 -> 2: one rank (grad_accum 2) stops at step 3; two ranks with sharded state (grad_accum 1) finish."""
    rank_main(job(setup, "one", "from-one", 1, stop=STOP), 0)
    errs = run(setup, "sharded", "from-one", 2, resume=True)
    assert "saved by 1 rank and resumes on 2: optimizer state re-cut from 1 shard to 2" in errs[0]
    got = load_checkpoint(str(setup / "from-one"))
    assert got.step == STEPS and same_state(got, straight)
    assert losses(setup, "from-one") == losses(setup, "straight")
