"""Data-parallel BCD on 2 gloo ranks on the CPU: the same training as one rank over the same global batch, bytes on
the wire from the trace, sharded optimizer state, a rank killed with -9, and a plan for another world refused.

Each rank is a separate process started the way torchrun starts one (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
its environment), running tests/runtime/dist_worker.py or the `blockfit train` command line.

The equality bound. One rank with grad_accum 2 and micro-batch b, against 2 ranks with grad_accum 1 and micro-batch
b, over the same 2b sequences (runtime.data.next_step gives rank r the r-th b of them). One rank's gradient is
g0/2 + g1/2 (each micro-batch's loss is divided by grad_accum = 2 before its backward, an exact power-of-two
scaling, so the backward yields exactly g_k/2), accumulated in that order; 2 ranks hold g0 and g1 (rank 0's bucket
starts at zero: 0 + g0 = g0 exactly), the all-reduce forms g0 + g1 (one fp32 addition, commutative, the same on both
ranks) and divides by 2. round(g0 + g1)/2 = round(g0/2 + g1/2) exactly, as scaling by 2 commutes with rounding
(no subnormals here), so the gradients are bitwise equal, hence the clip, AdamW and the weights: unsharded state
is asserted BITWISE equal, losses too (the loss is reduced the same way).

Sharded state: AdamW over flat shards equals AdamW over per-parameter views element for element (elementwise
kernels; checked bitwise here), and the reduce-scatter forms the same single addition as the all-reduce, so the
one reduction whose order changes is the clip's global gradient norm: sqrt(sum over ranks of the squared norm of
each rank's shard) instead of the norm of per-parameter norms. Hence: with clipping off, sharded and unsharded are
asserted BITWISE equal. With clipping on, the norm is a sum of K squares (K <= 2^15 elements per block here) in
another order, off by at most gamma_K = K u / (1 - K u) relative (u = 2^-24; the bound for any summation order),
and both runs report it: asserted within gamma_K (a looser 2 gamma_K: the sqrt halves the relative error, the
squares add one rounding each). The clip coefficient inherits that delta. AdamW is scale-invariant in its
gradients except through eps, so that alone moves the updates by ~lr delta; but the next steps' gradients react to
the perturbed weights, and where an element's gradient is a near-cancelling sum (|g| ~ 1e-7 of its terms) Adam's
normalised update m_hat / sqrt(v_hat) turns an ulp-sized absolute change of g into a visible change of the update
(it is not Lipschitz near g = 0 when eps << |g|). So with clipping on we assert what is true of fp32 Adam: losses
within 1e-5 relative, almost every weight equal (mean |difference| <= 1e-6, a few ulp of |w| ~ 0.1) and none off
by more than 5% of the summed learning rates (each element's update is bounded by lr R, R = Adam's ratio bound),
while training moved the weights by 20 times more than the largest difference (measured: 2.2e-4 of 1.7e-2).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from planner.cluster import make_cluster, wire_bytes
from planner.plan import Plan, write_atomic
from planner.planning import predict
from planner.profile import profile_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import TC, TINY, P, reference_lr, tiny_plan, train, write_tokens  # noqa: E402

TIED = dataclasses.replace(TINY, name="tiny-tied", tie_embeddings=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "runtime", "dist_worker.py")
STEPS = 4
U = 2.0 ** -24
# every tier of the weights, the state and the activations; state and gradients on the device and on the host
PLACEMENTS = [P(0, "gpu", "gpu", "gpu"), P(1, "cpu", "cpu", "cpu"), P(2, "nvme", "gpu", "recompute"),
              P(3, "gpu", "nvme", "gpu"), P(4, "cpu", "gpu", "cpu"), P(5, "gpu", "cpu", "gpu")]
BLOCKS = ((0, 2), (3, 5))


def on_gpus(plan: Plan, gpus: int, *, shard: bool = False, grad_accum: int | None = None) -> Plan:
    """The plan for `gpus` GPUs of one node (as tests/planner/test_cluster.py makes one), optionally with another
    grad_accum, its prediction recomputed."""
    shape = dataclasses.replace(plan.shape, gpus=gpus, grad_accum=grad_accum or plan.shape.grad_accum)
    p = dataclasses.replace(plan, cluster=make_cluster(plan.hardware.gpu, gpus=gpus), shard_state=shard, shape=shape)
    return dataclasses.replace(p, predicted=predict(p, profile_model(p.model)))


def save_plan(plan: Plan, path: str) -> None:
    write_atomic(path, plan.to_json())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("BLOCKFIT_CHAOS", None)
    return env


def spawn(argv: list[str], world: int = 2, **kw) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen([sys.executable, *argv], env=rank_env(r, world, port), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) for r in range(world)]


def finish(procs, timeout: float = 120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank job training the unsharded and the sharded plan, and the 1-rank reference in this process."""
    tmp = tmp_path_factory.mktemp("dist")
    data = write_tokens(tmp / "tokens.bin")
    one = tiny_plan(PLACEMENTS, blocks=BLOCKS, steps_per_block=2, switch_state="keep_cpu")
    assert one.shape.micro_batch == 2 and one.shape.grad_accum == 2
    tied = tiny_plan(PLACEMENTS, cfg=TIED, blocks=BLOCKS, steps_per_block=2)   # the matrix trains in block 0
    plans = {"plain": on_gpus(one, 2, grad_accum=1), "sharded": on_gpus(one, 2, shard=True, grad_accum=1),
             "tied": on_gpus(tied, 2, grad_accum=1)}
    for name, plan in plans.items():
        save_plan(plan, str(tmp / f"{name}.json"))
    tc = dataclasses.replace(TC, steps=STEPS)
    clip = tc.adamw.clip
    runs = {"plain": [str(tmp / "plain.json"), clip, False], "sharded": [str(tmp / "sharded.json"), clip, False],
            "plain-noclip": [str(tmp / "plain.json"), 0.0, False],
            "sharded-noclip": [str(tmp / "sharded.json"), 0.0, False], "tied": [str(tmp / "tied.json"), clip, False],
            "sharded-allreduce": [str(tmp / "sharded.json"), clip, True]}   # the last: reduce_scatter made missing
    job = {"data": data, "out": str(tmp), "steps": STEPS, "lr": tc.lr, "min_lr": tc.min_lr, "warmup": tc.warmup,
           "weight_decay": tc.adamw.weight_decay, "runs": runs}
    (tmp / "job.json").write_text(json.dumps(job))
    procs = spawn([WORKER, str(tmp / "job.json")])
    # the reference trains while the ranks do
    ref = train(one, data, dataclasses.replace(tc, nvme_dir=str(tmp / "nvme1")))
    ref_tied = train(tied, data, dataclasses.replace(tc, nvme_dir=str(tmp / "nvme2")))
    results = finish(procs)
    assert all(rc == 0 for rc, _ in results), "\n".join(err[-3000:] for _, err in results)
    got = {name: [torch.load(tmp / f"{name}.rank{r}.pt") for r in range(2)] for name in runs}
    return {"one": one, "plans": plans, "ref": ref, "ref_tied": ref_tied, "got": got}


def test_two_ranks_equal_one_rank_accumulating_the_same_batch_bitwise(runs):
    losses, init, final, _ = runs["ref"]
    for r in range(2):
        got = runs["got"]["plain"][r]
        assert got["losses"] == losses
        assert all(torch.equal(got["weights"][k], final[k]) for k in final), \
            [k for k in final if not torch.equal(got["weights"][k], final[k])]
    assert any(not torch.equal(final[k], init[k]) for k in final)


def test_tied_embeddings_train_on_two_ranks_like_one_bitwise(runs):
    """A tied matrix trained in the embedding's block: the head's gradient of it (a hook's) is in the bucket."""
    losses, init, final, _ = runs["ref_tied"]
    got = runs["got"]["tied"][0]
    assert got["losses"] == losses
    assert all(torch.equal(got["weights"][k], final[k]) for k in final)
    assert not torch.equal(final["model.embed_tokens.weight"], init["model.embed_tokens.weight"])


def test_sharded_state_trains_like_unsharded(runs):
    losses, init, final, _ = runs["ref"]
    got = runs["got"]
    for r in range(2):   # clipping off: the same arithmetic in the same order
        a, b = got["sharded-noclip"][r], got["plain-noclip"][r]
        assert a["losses"] == b["losses"]
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert any(not torch.equal(got["plain-noclip"][0]["weights"][k], final[k]) for k in final)  # clip did bind
    lr_sum = sum(reference_lr(s, dataclasses.replace(TC, steps=STEPS)) for s in range(STEPS))
    moved = max((final[k] - init[k]).abs().max().item() for k in final)
    k_terms = max(sum(p.numel() for i in b.layers for p in _layers(runs["one"])[i].parameters())
                  for b in runs["one"].blocks)
    gamma = k_terms * U / (1 - k_terms * U)
    for r in range(2):   # clipping on: only the global norm's summation order differs
        s, p = got["sharded"][r], got["plain"][r]
        assert s["grad_norms"] == pytest.approx(p["grad_norms"], rel=2 * gamma)
        assert s["losses"] == pytest.approx(losses, rel=1e-5)
        diffs = torch.cat([(s["weights"][k] - final[k]).abs().flatten() for k in final])
        assert diffs.mean().item() <= 1e-6 and diffs.max().item() <= 0.05 * lr_sum, (diffs.mean(), diffs.max())
        assert moved > 20 * diffs.max().item()   # the bound is not vacuous: training moved the weights more
    a, b = (got["sharded"][r]["weights"] for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)   # every rank ends with the same weights (all-gathered)
    for r in range(2):   # where gloo lacks reduce_scatter: an all-reduce and this rank's slice, the same sums
        c = got["sharded-allreduce"][r]
        assert c["losses"] == got["sharded"][r]["losses"]
        assert all(torch.equal(c["weights"][k], a[k]) for k in a)


def test_bytes_each_rank_sends_are_the_active_blocks_gradients(runs):
    """From the trace: per step, each net op's bytes; expected from the ring formulas written out here, on the
    runtime's fp32 buffers: all-reduce 2(N-1)/N x 4 x params per trained layer; sharded, reduce-scatter and
    all-gather (N-1)/N x 4 x N k each, k = ceil(params / N) (the padded buffer); with reduce_scatter missing, its
    all-reduce stand-in 2(N-1)/N x 4 x N k; nothing for a frozen layer."""
    plan, n = runs["one"], 2
    params = [sum(p.numel() for p in lay.parameters()) for lay in _layers(plan)]
    ring = {"all_reduce": lambda s: 2 * (n - 1) * s // n, "reduce_scatter": lambda s: (n - 1) * s // n,
            "all_gather": lambda s: (n - 1) * s // n}
    for name, shard, reduce in (("plain", False, "all_reduce"), ("sharded", True, "reduce_scatter"),
                                ("sharded-noclip", True, "reduce_scatter"), ("sharded-allreduce", True, "all_reduce")):
        for r in range(2):
            spans = runs["got"][name][r]["spans"]
            for step in range(STEPS):
                block = plan.blocks[(step // plan.steps_per_block) % len(plan.blocks)]
                mine = [sp for sp in spans if sp["step"] == step]
                assert {sp["layer"] for sp in mine} == set(block.layers)   # frozen layers send nothing
                kinds = sorted(sp["kind"] for sp in mine)
                assert kinds == sorted(["reduce_grads"] * len(block.layers)
                                       + (["gather_weights"] * len(block.layers) if shard else []))
                for sp in mine:
                    p = params[sp["layer"]]
                    buf = 4 * (n * -(-p // n) if shard else p)
                    want = ring[reduce](buf) if sp["kind"] == "reduce_grads" else ring["all_gather"](buf)
                    assert sp["bytes"] == want, (name, sp)
                    assert sp["bytes"] == wire_bytes(reduce if sp["kind"] == "reduce_grads" else "all_gather",
                                                     buf, n)   # the one rule the planner and simulator use
                if not shard:   # 2(N-1)/N = 1 at N = 2: the active block's gradient bytes
                    assert sum(sp["bytes"] for sp in mine) == 4 * sum(params[i] for i in block.layers)


def _layers(plan):
    from runtime.model import meta_layers
    return meta_layers(plan.model)


def test_a_plan_for_another_world_is_refused(tmp_path, monkeypatch, capsys):
    """A 2-GPU plan on one process, and a 1-GPU plan on rank 0 of 2 (the environment torchrun gives it): exit 2 with
    the reason, before any rendezvous or training."""
    from tools.cli import run
    data = write_tokens(tmp_path / "tokens.bin", n=4000)
    one = tiny_plan(blocks=BLOCKS)
    p1, p2 = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    save_plan(one, p1)
    save_plan(on_gpus(one, 2, grad_accum=1), p2)
    cmd = ["train", "--data", data, "--steps", "1", "--quiet", "--cpu", "--plan"]
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert run(cmd + [p2]) == 2
    err = capsys.readouterr().err
    assert "plan is for 2 GPUs" in err and "1 rank" in err and "--nproc-per-node 2" in err
    assert run(cmd + [p1, "--nproc-per-node", "2"]) == 2   # the launcher checks before it starts anything
    assert "plan is for 1 GPU but this run has 2 ranks" in capsys.readouterr().err
    for k, v in rank_env(0, 2, free_port()).items():
        monkeypatch.setenv(k, v)
    assert run(cmd + [p1]) == 2
    assert "plan is for 1 GPU but this run has 2 ranks" in capsys.readouterr().err


def test_killed_rank_makes_the_other_exit_with_a_message(tmp_path):
    """kill -9 of rank 1 mid-run: rank 0 exits within 60 s, non-zero (4), saying another rank stopped."""
    data = write_tokens(tmp_path / "tokens.bin", n=8000)
    plan = on_gpus(tiny_plan(blocks=BLOCKS), 2, grad_accum=1)
    path = str(tmp_path / "two.json")
    save_plan(plan, path)
    metrics = str(tmp_path / "m.jsonl")
    procs = spawn(["-m", "tools.cli", "train", "--plan", path, "--data", data, "--steps", "100000", "--quiet",
                   "--cpu", "--metrics", metrics, "--dist-timeout", "300"])
    try:
        deadline = time.monotonic() + 90
        while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 1):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"rank 1 killed, rank 0 exited {waited:.1f} s later with exit {procs[0].returncode}")
    assert procs[0].returncode == 4, err[-2000:]
    assert "rank 0 of 2" in err and "another rank stopped answering" in err and "Traceback" not in err
    assert waited < 60


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
def test_nproc_per_node_launches_torchrun_and_a_killed_rank_stops_the_run(tmp_path):
    """`blockfit train --nproc-per-node 2` runs the plan on 2 ranks under torchrun's agent (each rank writes its own
    metrics); kill -9 of one rank ends the whole run within 60 s, non-zero, leaving no rank behind."""
    data = write_tokens(tmp_path / "tokens.bin", n=8000)
    path = str(tmp_path / "two.json")
    save_plan(on_gpus(tiny_plan(blocks=BLOCKS), 2, grad_accum=1), path)
    metrics = tmp_path / "m.jsonl"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    agent = subprocess.Popen([sys.executable, "-m", "tools.cli", "train", "--nproc-per-node", "2", "--plan", path,
                              "--data", data, "--steps", "100000", "--quiet", "--cpu", "--metrics", str(metrics)],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        other = tmp_path / "m.rank1.jsonl"
        while not all(p.exists() and p.read_text().count("\n") >= 1 for p in (metrics, other)):
            assert time.monotonic() < deadline and agent.poll() is None, agent.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = [c for c in _children(agent.pid) if os.path.exists(f"/proc/{c}")]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        _, err = agent.communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    print(f"torchrun: rank killed, the run ended {waited:.1f} s later with exit {agent.returncode}")
    assert agent.returncode != 0 and waited < 60, err[-3000:]
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{w}") and "zombie" not in open(f"/proc/{w}/status").read().lower()
                   for w in workers)


def test_ranks_read_disjoint_slices_of_the_global_batch(tmp_path):
    """N ranks at grad_accum g read, together and in order, exactly the windows one rank reads with grad_accum N g,
    rank r the r-th g micro-batches of each step; every rank's cursor ends where the single rank's does."""
    from runtime.data import TokenData
    path = write_tokens(tmp_path / "t.bin", n=3000)
    single = TokenData.open(path, seq_len=16, seed=3)   # 176 windows: 4 steps of 48 cross an epoch boundary
    ranks = [TokenData.open(path, seq_len=16, seed=3) for _ in range(3)]
    for _ in range(4):
        want = [single.next_batch(4) for _ in range(3 * 4)]
        for r, d in enumerate(ranks):
            got = d.next_step(4, 4, rank=r, world=3)
            for (x, y), (wx, wy) in zip(got, want[4 * r:4 * (r + 1)], strict=True):
                assert torch.equal(x, wx) and torch.equal(y, wy)
    assert all(d.state_dict() == single.state_dict() for d in ranks)
    assert single.epoch == 1
