"""The world: which rank this process is, of how many, on which node. The one module that knows.

torchrun (or `blockfit train --nproc-per-node N`, which launches it) sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE in each process's environment; `from_env` reads them once and the rest of the runtime receives
the resulting `World`, it does not look at the environment again. A process started without torchrun is rank 0
of a world of 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from planner.errors import UserError


@dataclass(frozen=True, kw_only=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0         # rank within the node
    local_size: int = 1         # ranks on this node

    @property
    def node(self) -> int:
        return self.rank // self.local_size

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0 writes what is written once (the weights of a checkpoint, the trace summary)."""
        return self.rank == 0


SINGLE = World()


def from_env(env: dict | None = None) -> World:
    """The world torchrun describes in the environment; a world of one without it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        w = World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                  local_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    except (KeyError, ValueError) as e:
        raise UserError(f"the torchrun environment is incomplete or not numeric ({e}); start the run with "
                        "`torchrun --nproc-per-node N ...` or `blockfit train --nproc-per-node N ...`.") from None
    if not (0 <= w.rank < w.size and 0 <= w.local_rank < w.local_size and w.size % w.local_size == 0):
        raise UserError(f"the torchrun environment is inconsistent (RANK {w.rank}, WORLD_SIZE {w.size}, "
                        f"LOCAL_RANK {w.local_rank}, LOCAL_WORLD_SIZE {w.local_size}).")
    return w
