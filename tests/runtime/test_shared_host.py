"""The ranks of a node hold one copy of the weights they stream from host memory, and one set of NVMe weight files.

Two CPU ranks of one node (a gloo world of two processes) build the runtime's TieredStore over the same layers:
three on the cpu tier (streamed from host memory), one on nvme, one resident. Each rank then reads its memory
map (/proc/self/smaps) for the node's shared buffer. Expected values from the weight byte formula: the cpu-tier
layers hold sum(round_up(numel * 4 B, 4 KiB)) bytes (float32 on the CPU stand-in, each layer page-aligned); each
rank maps all of it (Rss = the total), all of it shared and none private, and the two ranks' proportional
shares (Pss = Rss / number of ranks mapping a page) add up to the total: one copy on the node, not two.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest

from runtime.nodeshare import reclaim_shm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUMELS = [1 << 20, 3 << 18, 1 << 20, 1 << 18, 1 << 16]   # float32: 4 MiB, 3 MiB, 4 MiB, 1 MiB, 256 KiB
TIERS = ["cpu", "cpu", "nvme", "gpu", "cpu"]

_RANK = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    from runtime.dist import World
    from runtime.store import FlatLayout, Target, TieredStore
    rank, size, init, nvme = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=size)
    world = World(rank=rank, size=size, local_rank=rank, local_size=size)
    numels, tiers = {numels!r}, {tiers!r}
    layouts = [FlatLayout(names=("w",), shapes=((n,),), offsets=(0,), numel=n) for n in numels]
    store = TieredStore(target=Target.detect(force_cpu=True), layouts=layouts, tiers=tiers, nvme_dir=nvme,
                        window_layers=2, world=world)
    for i, n in enumerate(numels):   # each rank offers other values: the shared tiers keep local rank 0's
        store.put(i, torch.full((n,), float(i + 1 + 100 * rank)))
    store.placed()
    seen = [store.get(i)[[0, -1]].tolist() for i in range(len(numels))]   # reads (faults in) every page
    files = sorted(os.path.relpath(os.path.join(d, f), nvme) for d, _, fs in os.walk(nvme) for f in fs)
    dist.barrier()   # both ranks map every page before either measures

    def mapping():
        out, inside = {{}}, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and not head[0].endswith(":"):
                    inside = "blockfit-" in line and "-weights" in line
                elif inside and head[0].endswith(":") and head[-1] == "kB":
                    out[head[0][:-1]] = out.get(head[0][:-1], 0) + int(head[1])
        return out
    figures = mapping()
    dist.barrier()   # both measured before either changes anything
    if rank == 1:    # after placement every rank writes its updates to the node's copy itself
        store.pinned(0).fill_(7.0)
    dist.barrier()
    after = store.pinned(0)[[0, -1]].tolist()
    print(json.dumps({{"seen": seen, "smaps": figures, "files": files, "after": after,
                      "name_left": os.path.exists(store.shared.path), "host_bytes": store.host.settle()}}))
    store.close()
    dist.barrier()
    dist.destroy_process_group()
""")


def _round_up(n: int, to: int = 4096) -> int:
    return -(-n // to) * to


@pytest.mark.parametrize("nvme_dirs", ["one", "per-rank"])
def test_two_ranks_of_a_node_hold_one_copy(tmp_path, nvme_dirs):
    """nvme_dirs 'per-rank': each rank is given its own --nvme-dir (two drives): the host copy is still one, and
    rank 1, finding no node directory in its own, keeps and writes its own NVMe weight file."""
    nvme = [tmp_path / (f"nvme{r}" if nvme_dirs == "per-rank" else "nvme") for r in range(2)]
    script = _RANK.format(repo=REPO, numels=NUMELS, tiers=TIERS)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), "2", str(tmp_path / "pg"), str(nvme[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))

    shared = sum(_round_up(n * 4) for n, t in zip(NUMELS, TIERS) if t == "cpu")   # 4 + 3 + 0.25 MiB
    assert shared == (4 + 3 + 0.25) * 2**20
    for rank, o in enumerate(outs):
        # the shared tiers hold local rank 0's values on both ranks; the resident layer is each rank's own
        own = ("gpu", "nvme") if nvme_dirs == "per-rank" else ("gpu",)
        want = [float(i + 1 + (100 * rank if t in own else 0)) for i, t in enumerate(TIERS)]
        assert o["seen"] == [[w, w] for w in want]
        m = o["smaps"]
        assert m["Rss"] * 1024 == shared, m
        assert (m["Shared_Clean"] + m["Shared_Dirty"]) * 1024 == shared and m["Private_Clean"] + m["Private_Dirty"] == 0
        assert o["after"] == [7.0, 7.0]           # rank 1's write is in rank 0's memory: the same pages
        assert not o["name_left"]                 # the name went once both had mapped it
        # NVMe: one weight file for the node, in the node's directory; the ranks' own directories hold none
        weights = [f for f in o["files"] if "weights-" in f]
        in_node_dir = "-node0" in weights[0] if weights else None
        assert len(weights) == 1 and weights[0].endswith("weights-L2.bin")
        assert in_node_dir == (rank == 0 or nvme_dirs == "one")
    assert sum(o["smaps"]["Pss"] for o in outs) * 1024 == shared     # one copy on the node, not two
    # the host ledger counts the node's copy once, on local rank 0
    assert outs[0]["host_bytes"] - outs[1]["host_bytes"] == sum(n * 4 for n, t in zip(NUMELS, TIERS) if t == "cpu")
    for d in set(nvme):   # the last rank out removed the node's directory; each rank its own
        assert not [n for n in os.listdir(d) if n.startswith("blockfit-")]


def test_reclaim_removes_a_dead_runs_file_and_keeps_a_live_one(tmp_path):
    dead = tmp_path / "blockfit-123-ab12cd34-node0-weights"
    live = tmp_path / "blockfit-456-ef56ab78-node1-weights"
    other = tmp_path / "blockfit-notes"
    for f in (dead, live, other):
        f.write_bytes(b"x" * 8192)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # its creator is alive
        assert reclaim_shm(str(tmp_path)) == 8192
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["cpu", "nvme"])
def test_one_rank_alone_keeps_its_private_buffers(tmp_path, kind):
    """A world of one (or one rank per node) makes no shared buffer and no node directory."""
    import torch

    from runtime.store import FlatLayout, Target, TieredStore
    layouts = [FlatLayout(names=("w",), shapes=((64,),), offsets=(0,), numel=64)]
    store = TieredStore(target=Target.detect(force_cpu=True), layouts=layouts, tiers=[kind],
                        nvme_dir=str(tmp_path), window_layers=2)
    try:
        store.put(0, torch.arange(64.0))
        assert store.shared is None and store.weight_files is store.files
        assert torch.equal(store.get(0), torch.arange(64.0))
    finally:
        store.close()
