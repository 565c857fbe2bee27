"""The world: which rank this process is, of how many, on which node, and the process group that joins them.
The one module that knows.

torchrun (or `blockfit train --nproc-per-node N`, which launches it) sets RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each process's environment; `from_env` reads them once and the
rest of the runtime receives the resulting `World`, it does not look at the environment again. A process started
without torchrun is rank 0 of a world of 1, and never touches torch.distributed.

`process_group(world, cuda=...)` opens the default process group for the run and closes it at the end:
gloo on the CPU; on CUDA one group that sends CUDA tensors over NCCL and host tensors (gradients the plan keeps
in pinned memory, state stepped by the CPU) over gloo (torch's "cpu:gloo,cuda:nccl" backend string).

A rank that dies: gloo notices at once (the peer's TCP connection closes and the waiting collective raises
"Connection closed by peer", measured at about 1 s), the runtime turns that into `PeerLost` (exit 4, one
paragraph naming the rank and the op). torchrun notices a dead worker too and stops the others (SIGTERM, then
SIGKILL). The group's timeout (`--dist-timeout`, default 300 s) bounds what neither notices: a peer that hangs
without dying, or NCCL waiting on a dead peer outside torchrun. It must exceed the longest gap between two
collectives, which is the leader's checkpoint save.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

from planner.errors import UserError

DEFAULT_TIMEOUT_SECONDS = 300.0
PEER_LOST_EXIT = 4   # the command line's exit code when another rank died or stopped answering


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


class PeerLost(UserError):
    """Another rank died, or a collective timed out: this rank stops (exit 4) rather than wait forever."""
    exit_code = PEER_LOST_EXIT


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


def check_plan_world(plan, world: World) -> None:
    """A plan made for N GPUs runs on exactly N ranks: never silently on fewer (a 2-GPU plan on one process
    would train with half the global batch) nor on more (a 1-GPU plan under torchrun would train N copies)."""
    if plan.world == world.size:
        return
    if plan.world == 1:
        raise UserError(f"the plan is for 1 GPU but this run has {world.size} ranks (WORLD_SIZE {world.size}); "
                        f"run it without torchrun, or make a plan for {world.size} GPUs "
                        f"(`plan --gpus {world.size} ...`).")
    raise UserError(f"the plan is for {plan.world} GPUs ({plan.cluster.nodes} node(s) x "
                    f"{plan.cluster.gpus_per_node}) but this run has {world.size} rank(s); start it with "
                    f"`blockfit train --nproc-per-node {plan.cluster.gpus_per_node} ...` (or torchrun with "
                    f"--nnodes {plan.cluster.nodes} --nproc-per-node {plan.cluster.gpus_per_node}), or make a "
                    f"plan for {world.size} GPU(s).")


def check_timeout(seconds) -> float:
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 1 <= seconds <= 86400):
        raise UserError(f"--dist-timeout must be a number of seconds from 1 to 86400, got {seconds!r}.")
    return float(seconds)


@contextlib.contextmanager
def process_group(world: World, *, cuda: bool, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS):
    """The default process group of a distributed run, open for the block (nothing for a world of one).
    Rendezvous is torchrun's: MASTER_ADDR and MASTER_PORT from the environment (env://)."""
    if not world.distributed:
        yield
        return
    import torch
    import torch.distributed as dist
    if cuda:
        torch.cuda.set_device(world.local_rank)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise UserError(f"WORLD_SIZE is {world.size} but {key} is not set; start the run with torchrun or "
                            "`blockfit train --nproc-per-node N`.")
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    except (RuntimeError, ValueError) as e:
        raise PeerLost(f"rank {world.rank} could not join the other {world.size - 1} rank(s) at "
                       f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_seconds:g} s "
                       f"({_short(e)}).") from None
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        # After a peer died, NCCL's destroy may wait on it; the process is exiting anyway.
        if not (failed and cuda):
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def peer_lost(world: World, what: str, err: BaseException) -> PeerLost:
    """The one message for a collective that failed because another rank is gone (or too slow)."""
    return PeerLost(f"rank {world.rank} of {world.size}: {what} failed because another rank stopped answering "
                    f"({_short(err)}). A rank died (killed, out of memory, a crash: see its own output) or hung "
                    f"past --dist-timeout; this rank stops too. Resume every rank from the last checkpoint with "
                    f"--resume.")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}"


def failed_ranks(world: World, ok: bool) -> list[int]:
    """The ranks for which `ok` is False, known to every rank: an all-reduce, so every rank must call it (it is
    also a barrier). Lets a rank that failed tell the others, which then stop too instead of waiting for it."""
    if world.size == 1:
        return [] if ok else [world.rank]
    import torch
    import torch.distributed as tdist
    if not tdist.is_initialized():
        raise RuntimeError(f"rank {world.rank} of {world.size} needs the process group to agree with the others")
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world.size, dtype=torch.int32, device=dev)
    flags[world.rank] = 0 if ok else 1
    _all_reduce(world, flags, tdist.ReduceOp.SUM, "agreeing with the other ranks")
    return [r for r, bad in enumerate(flags.tolist()) if bad]


def max_over_ranks(world: World, value: int) -> int:
    """The largest of every rank's `value` (a collective, like failed_ranks)."""
    if world.size == 1:
        return value
    import torch
    import torch.distributed as tdist
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    _all_reduce(world, t, tdist.ReduceOp.MAX, "agreeing with the other ranks")
    return int(t.item())


def _all_reduce(world: World, t, op, what: str) -> None:
    """An all-reduce whose failure (a rank died, or hung past the group's timeout: torch raises a RuntimeError)
    is PeerLost's one paragraph (exit 4), not a traceback."""
    import torch.distributed as tdist
    try:
        tdist.all_reduce(t, op=op)
    except RuntimeError as e:
        raise peer_lost(world, what, e) from None


def run_id(world: World) -> str:
    """A name this run's ranks share and no other run has: rank 0's pid and a random suffix, broadcast (names the
    node's shared host memory and NVMe directory, so two runs on one node never collide)."""
    import secrets
    ident = [f"{os.getpid()}-{secrets.token_hex(4)}"]
    if world.size > 1:
        import torch.distributed as tdist
        tdist.broadcast_object_list(ident, src=0)
    return ident[0]
