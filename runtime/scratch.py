"""Each run's NVMe scratch directory, and reclaiming those of runs that died.

A run makes its scratch directory blockfit-<pid>-<random> under --nvme-dir and holds an flock on it while it lives
(runtime.hostio.NvmeFiles). The kernel drops the lock with the process, even after kill -9, so a later run can tell
a dead run's directory from a live one's and remove it before it measures the free space it needs.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil

_SCRATCH_PREFIX = "blockfit-"
_SCRATCH_DIR = re.compile(r"^blockfit-(\d+)-")


def reclaim_scratch(nvme_dir: str) -> int:
    """Remove the scratch directories of runs that died (kill -9, power loss) under nvme_dir; returns the bytes
    freed. A run holds an flock on its scratch directory while it lives and the kernel drops it with the
    process, so a directory named like a run's scratch that can be locked is a dead run's. Directories of live
    runs, and anything not named like a run's scratch, are left alone."""
    freed = 0
    try:
        names = os.listdir(nvme_dir)
    except OSError:
        return 0
    for name in names:
        full = os.path.join(nvme_dir, name)
        if not _SCRATCH_DIR.match(name) or os.path.islink(full) or not os.path.isdir(full):
            continue
        try:
            fd = os.open(full, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run's
        else:
            freed += _tree_bytes(full)
            shutil.rmtree(full, ignore_errors=True)
        finally:
            os.close(fd)
    return freed


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total




def scratch_prefix() -> str:
    """The name prefix of this process's scratch directory."""
    return f"{_SCRATCH_PREFIX}{os.getpid()}-"
