"""Checkpoints of a world of N ranks: weights once, optimizer state once or per rank's shard, every rank's data
position and RNG, the world size in the manifest; re-cut on another world size.

The re-cut is checked against a reference written here with plain Python slicing (pad with zeros to
ceil(n / N) * N, slice the three parts master | exp_avg | exp_avg_sq separately). The save protocol runs with
its ranks as threads of this process (their agreement an in-process barrier standing in for the all-reduce),
so the files and the manifest are checked without starting processes; tests/runtime/test_dist_resume.py runs
real 2-rank gloo worlds.
"""
from __future__ import annotations

import errno
import json
import math
import os
import threading

import pytest
import torch

import runtime.checkpoint as ckmod
import runtime.ckpt_world as ckpt_world
from planner.errors import UserError
from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.dist import SINGLE, World
from runtime.reshard import cut, join, reshard_state, shard_range

# -- the reference: slicing by hand -------------------------------------------------------------------------------

def ref_shards(full: list[torch.Tensor], shards: int) -> list[torch.Tensor]:
    """full = [master, exp_avg, exp_avg_sq] of one layer; rank r's buffer, by hand."""
    n = full[0].numel()
    s = math.ceil(n / shards)
    out = []
    for r in range(shards):
        parts = []
        for part in full:
            vals = part.tolist() + [0.0] * (s * shards - n)
            parts.append(torch.tensor(vals[r * s:(r + 1) * s], dtype=part.dtype))
        out.append(torch.cat(parts))
    return out


def layer_state(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.rand(n, generator=g)]


@pytest.mark.parametrize("n", [1, 7, 10, 12])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_cut_and_join_against_slicing_by_hand(n, shards):
    flat = torch.arange(1, n + 1, dtype=torch.float32)
    s = math.ceil(n / shards)
    padded = list(range(1, n + 1)) + [0] * (s * shards - n)
    pieces = cut(flat, shards)
    assert [p.tolist() for p in pieces] == [padded[r * s:(r + 1) * s] for r in range(shards)]
    assert torch.equal(join(pieces, n), flat)
    assert [shard_range(n, shards, r) for r in range(shards)] == \
        [(min(r * s, n), min((r + 1) * s, n)) for r in range(shards)]


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2), (2, 3), (3, 2), (4, 4)])
@pytest.mark.parametrize("n", [5, 12, 13])
def test_reshard_state_against_slicing_by_hand(old, new, n):
    full = layer_state(n, seed=n)
    got = reshard_state(ref_shards(full, old), n, new)
    want = ref_shards(full, new)
    assert len(got) == new and all(torch.equal(a, b) for a, b in zip(got, want))


def test_reshard_refuses_shards_of_the_wrong_size():
    with pytest.raises(ValueError, match="holds"):
        reshard_state([torch.zeros(6), torch.zeros(9)], 5, 1)


# -- ranks as threads ---------------------------------------------------------------------------------------------

class ThreadWorld:
    """failed_ranks for N threads of one process: a barrier where every rank posts its flag."""

    def __init__(self, n: int):
        self.n, self.flags, self.barrier = n, [True] * n, threading.Barrier(n)

    def failed_ranks(self, world: World, ok: bool) -> list[int]:
        self.barrier.wait()
        self.flags[world.rank] = ok
        self.barrier.wait()
        out = [r for r, f in enumerate(self.flags) if not f]
        self.barrier.wait()
        return out


def run_ranks(monkeypatch, n: int, fn) -> list:
    """fn(world) on n threads as ranks 0..n-1 of one node; returns each one's result or exception."""
    tw = ThreadWorld(n)
    monkeypatch.setattr(ckpt_world, "failed_ranks", tw.failed_ranks)
    out: list = [None] * n

    def one(r):
        try:
            out[r] = fn(World(rank=r, size=n, local_rank=r, local_size=n))
        except Exception as e:  # noqa: BLE001 - handed to the test
            out[r] = e
    threads = [threading.Thread(target=one, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


LAYERS = {"L1.state": 13, "L2.state": 8}   # flat lengths: 13 does not divide by 2 or 3


def full_state(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    return {name: layer_state(n, seed + k) for k, (name, n) in enumerate(LAYERS.items())}


def rank_shard(full, shards: int, rank: int) -> dict[str, torch.Tensor]:
    return {name: ref_shards(parts, shards)[rank] for name, parts in full.items()}


def save_world(monkeypatch, ckpt_dir, n: int, *, sharded: bool, step: int = 5, full=None):
    full = full or full_state()
    weights = {"model.embed_tokens.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(9))}

    def save(world: World):
        opt = rank_shard(full, n, world.rank) if sharded else \
            {k: torch.cat(v) if world.rank == 0 else torch.zeros(3 * LAYERS[k]) for k, v in full.items()}
        return save_checkpoint(str(ckpt_dir), step, weights=weights if world.leader else {}, optimizer=opt,
                               meta={"plan": "p", "optimizer": {"1": {"step": 3}}}, world=world,
                               shards=n if sharded else 1, flat_numel=dict(LAYERS) if sharded else None,
                               rank_meta={"data": {"epoch": 0, "position": 8}, "rng": {"rank": world.rank}})
    return run_ranks(monkeypatch, n, save), weights, full


def test_two_ranks_write_weights_once_and_a_shard_each(tmp_path, monkeypatch):
    (paths, weights, full) = save_world(monkeypatch, tmp_path, 2, sharded=True)
    assert paths[0] == paths[1] == str(tmp_path / "step-000005")
    assert sorted(os.listdir(paths[0])) == ["meta.json", "model.safetensors",
                                            "optimizer-rank00000-of-00002.safetensors",
                                            "optimizer-rank00001-of-00002.safetensors"]
    raw = json.loads((tmp_path / "step-000005" / "meta.json").read_text())
    assert sorted(raw["files"]) == [n for n in sorted(os.listdir(paths[0])) if n != "meta.json"]
    assert [r["rng"] for r in raw["world"].pop("ranks")] == [{"rank": 0}, {"rank": 1}]
    assert raw["world"] == {"size": 2, "optimizer_shards": 2, "optimizer_numel": LAYERS}
    assert raw["meta"]["data"] == {"epoch": 0, "position": 8} and raw["meta"]["rng"] == {"rank": 0}   # rank 0's
    assert (tmp_path / "latest").read_text().strip() == "step-000005"
    for r in range(2):   # the same world: each rank gets back exactly its own shard, data position and RNG
        ck = load_checkpoint(str(tmp_path), world=World(rank=r, size=2, local_rank=r, local_size=2), shards=2)
        assert ck.world_size == 2 and not ck.note and ck.meta["rng"] == {"rank": r}
        assert all(torch.equal(ck.optimizer[k], v) for k, v in rank_shard(full, 2, r).items())
        assert torch.equal(ck.weights["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])


@pytest.mark.parametrize("new", [1, 3])
def test_a_two_rank_manifest_loads_on_another_world_with_the_state_recut(tmp_path, monkeypatch, new):
    _, _, full = save_world(monkeypatch, tmp_path, 2, sharded=True)
    for r in range(new):
        world = World(rank=r, size=new, local_rank=r, local_size=new) if new > 1 else SINGLE
        ck = load_checkpoint(str(tmp_path), world=world, shards=new)
        want = rank_shard(full, new, r)
        assert ck.optimizer.keys() == want.keys() and all(torch.equal(ck.optimizer[k], want[k]) for k in want)
        assert "re-cut from 2 shards to" in ck.note and "saved by 2 ranks and resumes on" in ck.note
        assert ck.meta["data"] == {"epoch": 0, "position": 8} and ck.meta["rng"] == {"rank": min(r, 1)}
    if new == 1:   # unsharded on one rank: the layer's whole state, master | exp_avg | exp_avg_sq
        ck = load_checkpoint(str(tmp_path))
        assert all(torch.equal(ck.optimizer[k], torch.cat(v)) for k, v in full.items())


def test_unsharded_state_is_written_once_by_rank_0_and_cut_for_a_sharded_world(tmp_path, monkeypatch):
    _, _, full = save_world(monkeypatch, tmp_path, 2, sharded=False)
    assert sorted(os.listdir(tmp_path / "step-000005")) == ["meta.json", "model.safetensors", "optimizer.safetensors"]
    ck = load_checkpoint(str(tmp_path), world=World(rank=1, size=2, local_rank=1, local_size=2))
    assert all(torch.equal(ck.optimizer[k], torch.cat(v)) for k, v in full.items())   # rank 0's, not rank 1's zeros
    ck = load_checkpoint(str(tmp_path), world=World(rank=1, size=2, local_rank=1, local_size=2), shards=2)
    assert all(torch.equal(ck.optimizer[k], v) for k, v in rank_shard(full, 2, 1).items())


def test_a_damaged_shard_is_refused_by_the_ranks_that_read_it(tmp_path, monkeypatch):
    save_world(monkeypatch, tmp_path, 2, sharded=True)
    shard = tmp_path / "step-000005" / "optimizer-rank00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    load_checkpoint(str(tmp_path), world=World(rank=0, size=2, local_rank=0, local_size=2), shards=2)  # not its file
    for world, shards in ((World(rank=1, size=2, local_rank=1, local_size=2), 2), (SINGLE, 1)):
        with pytest.raises(UserError, match="optimizer-rank00001-of-00002.safetensors is unreadable or corrupt"):
            load_checkpoint(str(tmp_path), world=world, shards=shards)


def test_one_rank_failing_to_write_fails_every_rank_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_world(monkeypatch, tmp_path, 2, sharded=True, step=4)
    write = ckmod._write_tensors

    def full_disk(path, tensors):
        if "rank00001" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, tensors)
    monkeypatch.setattr(ckmod, "_write_tensors", full_disk)
    results, _, _ = save_world(monkeypatch, tmp_path, 2, sharded=True, step=5)
    for e in results:   # both ranks stop with the same paragraph; rank 1 adds why
        assert isinstance(e, UserError) and "rank 1 of 2 failed" in str(e) and "step-000004' is intact" in str(e)
    assert "No space left on device" in str(results[1])
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-000004"]   # no temporary directory left
    assert load_checkpoint(str(tmp_path), world=World(rank=1, size=2, local_rank=1, local_size=2), shards=2).step == 4


# -- what a resume on another world size may change --------------------------------------------------------------

def test_another_world_size_must_keep_the_global_batch():
    """A plan's batch per rank may change with the world size, the sequences per optimizer step may not."""
    import dataclasses
    import sys

    from planner.cluster import make_cluster
    from runtime.checkpoint import Checkpoint
    from runtime.guards import check_same_plan, resume_signature
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_equivalence import tiny_plan

    one = tiny_plan()   # micro-batch 2, grad_accum 2: 4 sequences a step

    def on(gpus: int, grad_accum: int):
        return dataclasses.replace(one, cluster=make_cluster(one.hardware.gpu, gpus=gpus),
                                   shape=dataclasses.replace(one.shape, gpus=gpus, grad_accum=grad_accum))
    saved = Checkpoint(step=3, path="ck/step-000003", weights={}, optimizer={}, world_size=2,
                       meta={"plan": resume_signature(on(2, 1))})
    check_same_plan(one, saved, 1)         # 2 x 2 x 1 = 1 x 2 x 2
    check_same_plan(on(2, 1), saved, 2)    # the same world
    with pytest.raises(UserError, match=r"global batch \(4 sequences per step on 2 ranks, 2 on 1\)"):
        check_same_plan(on(1, 1), saved, 1)
    with pytest.raises(UserError, match="grad_accum"):
        check_same_plan(on(2, 2), saved, 2)   # the same world keeps the batch per rank too


# -- the node's shared buffer when a rank cannot make it -----------------------------------------------------------

def test_a_shared_buffer_that_cannot_be_made_fails_every_rank(tmp_path, monkeypatch):
    import runtime.nodeshare as nodeshare
    from runtime.hostio import HostMemory
    tw = ThreadWorld(2)
    monkeypatch.setattr(nodeshare, "failed_ranks", tw.failed_ranks)
    missing = str(tmp_path / "no-such-dir")
    out = run_ranks(monkeypatch, 2, lambda w: nodeshare.SharedHostBuffer(HostMemory(pin=False), 1 << 16, world=w,
                                                                         run="1-ab", shm_dir=missing))
    for e in out:   # local rank 0 could not create it; both ranks say so instead of one waiting for the other
        assert isinstance(e, UserError) and "rank 0 failed" in str(e) and missing in str(e)
    ok = run_ranks(monkeypatch, 2, lambda w: nodeshare.SharedHostBuffer(HostMemory(pin=False), 1 << 16, world=w,
                                                                        run="1-ab", shm_dir=str(tmp_path)))
    ok[0].view(0, 16, torch.float32).fill_(5.0)   # one buffer: rank 0's write is what rank 1 sees
    assert ok[1].view(0, 16, torch.float32).tolist() == [5.0] * 16 and os.listdir(tmp_path) == []
