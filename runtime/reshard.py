"""Re-cutting sharded optimizer state for another number of ranks: pure functions over tensors.

With the plan's shard_state, each of the N ranks holds the AdamW state of its shard of every trained layer. A
layer's flat parameter vector of `numel` elements is padded with zeros to a multiple of N and cut evenly:
rank r owns elements [r*s, (r+1)*s) with s = planner.memory.shard_params(numel, N), the one rule for a shard's
size; the last rank's shard ends in up to N-1 elements of padding. Its state is one flat fp32 buffer of 3*s
(master | exp_avg | exp_avg_sq over its slice), the single-rank layout (runtime.optim) restricted to the slice.
Unsharded state is the same thing with N = 1: one buffer of 3*numel, no padding.

Changing the world from N to M ranks therefore means, for each of the three parts separately: concatenate the N
slices, drop the padding (the first numel elements are the vector), pad for M and cut again. Elementwise AdamW
makes this exact: every element's master and moments move with it, and nothing else in the state depends on
where the cuts are (a layer's step count is the same on every rank).
"""
from __future__ import annotations

import torch

from planner.memory import shard_params

PARTS = 3   # master | exp_avg | exp_avg_sq


def shard_range(numel: int, shards: int, rank: int) -> tuple[int, int]:
    """The elements [start, end) of the flat vector that `rank` owns, padding excluded (end may equal start)."""
    s = shard_params(numel, shards)
    return min(rank * s, numel), min((rank + 1) * s, numel)


def cut(flat: torch.Tensor, shards: int) -> list[torch.Tensor]:
    """A flat vector cut into `shards` equal pieces of shard_params(numel, shards), the last zero-padded."""
    numel = flat.numel()
    s = shard_params(numel, shards)
    padded = torch.zeros(s * shards, dtype=flat.dtype)
    padded[:numel] = flat.reshape(-1)
    return [padded[r * s:(r + 1) * s].clone() for r in range(shards)]


def join(pieces: list[torch.Tensor], numel: int) -> torch.Tensor:
    """The flat vector of `numel` elements that `pieces` (one per rank, in rank order) cut; padding dropped."""
    s = shard_params(numel, len(pieces))
    if any(p.numel() != s for p in pieces):
        raise ValueError(f"shards of a {numel}-element vector over {len(pieces)} ranks hold {s} elements each, "
                         f"got {[p.numel() for p in pieces]}")
    return torch.cat([p.reshape(-1) for p in pieces])[:numel]


def reshard_state(buffers: list[torch.Tensor], numel: int, shards: int) -> list[torch.Tensor]:
    """One layer's state buffers (3*s each, one per old rank, in rank order) re-cut into `shards` buffers."""
    s_old = shard_params(numel, len(buffers))
    if any(b.numel() != PARTS * s_old for b in buffers):
        raise ValueError(f"a state shard of a {numel}-element layer over {len(buffers)} ranks holds "
                         f"{PARTS * s_old} elements, got {[b.numel() for b in buffers]}")
    parts = [join([b.reshape(-1)[k * s_old:(k + 1) * s_old] for b in buffers], numel) for k in range(PARTS)]
    recut = [cut(p, shards) for p in parts]                 # recut[part][rank]
    return [torch.cat([recut[k][r] for k in range(PARTS)]) for r in range(shards)]


def reshard(by_rank: list[dict[str, torch.Tensor]], numel: dict[str, int],
            shards: int) -> list[dict[str, torch.Tensor]]:
    """Every state tensor of a checkpoint (one dict per old rank, the same names in each) re-cut for `shards`
    ranks; numel[name] is that layer's flat vector length. Returns one dict per new rank."""
    names = set(by_rank[0])
    if any(set(d) != names for d in by_rank):
        raise ValueError("the ranks' optimizer shards name different tensors")
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name in sorted(names):
        for r, buf in enumerate(reshard_state([d[name] for d in by_rank], numel[name], shards)):
            out[r][name] = buf
    return out
