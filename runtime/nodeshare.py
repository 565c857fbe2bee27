"""Host shared memory for the ranks of a node: one copy of the weights they stream from host memory.

A world's ranks on one node (World.local_size > 1) all hold the same frozen weights; a private pinned copy per rank
would multiply the node's host RAM by its ranks (eight RTX 4090s streaming a 70B model's 140 GB of bf16 weights
would ask for 1.1 TB). runtime.store puts the cpu tier of a node's ranks into one SharedHostBuffer instead.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import re

import torch

from planner.errors import UserError
from runtime.dist import World, failed_ranks
from runtime.hostio import HostMemory, round_up

SHM_DIR = "/dev/shm"
_SHM_FILE = re.compile(r"^blockfit-\d+-[0-9a-f]+-node\d+-weights$")


class SharedHostBuffer:
    """One host buffer shared by the ranks of a node: a file in host shared memory (/dev/shm, a tmpfs), named by
    run and node, created and sized by local rank 0 (posix_fallocate, so a full /dev/shm is an error now rather
    than a SIGBUS at the first write), mapped MAP_SHARED by every local rank and pinned by each with
    cudaHostRegister (HostMemory.adopt). Once every rank has mapped it, local rank 0 removes the name: the memory
    lives while a mapping does, so it is freed when the last rank exits, even by kill -9. Only a run killed
    between creating and removing the name leaves a file behind; local rank 0 holds an flock on it until then,
    so the next run's reclaim_shm can tell a dead run's file and remove it."""

    def __init__(self, host: HostMemory, nbytes: int, *, world: World, run: str, shm_dir: str = SHM_DIR):
        self.path = os.path.join(shm_dir, f"blockfit-{run}-node{world.node}-weights")
        self.nbytes = round_up(max(1, nbytes))
        lead, fd, err = world.local_rank == 0, None, None
        try:
            if lead:
                reclaim_shm(shm_dir)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.posix_fallocate(fd, 0, self.nbytes)
        except OSError as e:
            err = e
        failed = failed_ranks(world, err is None)   # the file exists (or every rank learns it does not)
        try:
            if not failed:
                if fd is None:
                    fd = os.open(self.path, os.O_RDWR)
                self._map = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            err = e
        finally:
            failed = failed or failed_ranks(world, err is None)   # every rank has mapped it
            if lead:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            if fd is not None:
                os.close(fd)
        if failed:
            why = f": {err.strerror or err}" if err is not None else ""
            raise UserError(f"could not share the node's host copy of the weights in '{self.path}' (rank"
                            f"{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed{why}); "
                            f"{shm_dir} must be a writable tmpfs with room for {self.nbytes} bytes.")
        self.tensor = host.adopt(torch.frombuffer(self._map, dtype=torch.uint8), count=lead)

    def view(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.tensor[offset:offset + numel * dtype.itemsize].view(dtype)


def reclaim_shm(shm_dir: str = SHM_DIR) -> int:
    """Remove shared weight files that runs killed while creating them left in shm_dir; returns the bytes freed.
    A live run's creator holds an flock on its file, so one that can be locked is a dead run's."""
    freed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        if not _SHM_FILE.match(name):
            continue
        full = os.path.join(shm_dir, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            freed += os.fstat(fd).st_size
            os.unlink(full)
        except OSError:
            pass  # a live run's
        finally:
            os.close(fd)
    return freed
