"""The host side of the tiers: host buffers and NVMe files.

HostMemory is the runtime's one allocator of host-tier buffers (pinned weights, offloaded activations, NVMe
staging, the CPU optimizer's state and workspace) and counts each while it lives, so the plan's host RAM can be
checked against what the run holds. Pinned buffers are ordinary memory of exactly the requested size, registered
with cudaHostRegister on CUDA, never PyTorch's caching host allocator, which rounds every block up to a power of
two (../shared/reference/hardware.md). Buffers are 4 KiB-aligned, as O_DIRECT requires.

NvmeFiles is the NVMe tier: one file per layer under --nvme-dir, read with O_DIRECT and several requests in flight
(where the filesystem refuses O_DIRECT, posix_fadvise DONTNEED first), so each read reaches the drive, as it does
when host RAM is short, which is why the plan chose NVMe; writes are made durable, then dropped from the cache.
StagingPool holds the pinned staging buffers those reads and writes go through.

The ranks of a node share what is the same on each of them: runtime.nodeshare.SharedHostBuffer is one host buffer
for the node's copy of the weights streamed from host memory, and NvmeFiles(shared=...) one directory for its NVMe
weight files,
so a node holds them once, not once per rank. After the first placement, which local rank 0 alone writes, every
rank writes its updates there itself, and they are the same bytes on every rank (the gradients are reduced, or the
sharded updates all-gathered, before anything is written). That is safe without a lock because of the reduction:
a rank writes step t's update of layer L only once L's gradients of step t are reduced, which every rank joins
only after its last use of L's weights in step t; its next read of L (step t+1) follows its own write of the
same bytes. (Ranks that never synchronise, replicas, would race: a fast one would overwrite what a slow one has
yet to read.)
"""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import secrets
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from planner.errors import UserError
from runtime.dist import World, failed_ranks
from runtime.scratch import reclaim_scratch, scratch_prefix

BLOCK = 4096   # O_DIRECT alignment of buffers, offsets and lengths


def round_up(n: int, to: int = BLOCK) -> int:
    return -(-n // to) * to


def aligned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor starting on a 4 KiB boundary and owning whole 4 KiB blocks (for O_DIRECT reads)."""
    nbytes = round_up(max(1, numel * dtype.itemsize))
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    start = (-raw.data_ptr()) % BLOCK
    return raw[start:start + nbytes].view(dtype)[:numel]


class HostMemory:
    """Exact-size host buffers, 4 KiB aligned (so NVMe reads can bypass the page cache into them), page-locked
    with cudaHostRegister when there is a GPU (plain memory otherwise). What is registered is the buffer's size
    rounded up to a 4 KiB block, never a power of two.

    Every host-tier buffer the runtime holds comes from here (pinned weights, offloaded activations, NVMe staging,
    optimizer state, gradient accumulators, the CPU AdamW's workspace), so this is also the host ledger: the bytes
    asked for while each buffer's storage lives (a weak reference tells when it is freed), and their peak, which is
    exact because it can only rise at an allocation. planner.memory predicts the same figure. Not counted: the
    alignment slack, under 8 KiB a buffer (the storage is rounded up to 4 KiB plus one block to align its start)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._pinned: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def empty(self, numel: int, dtype: torch.dtype, *, pin: bool | None = None) -> torch.Tensor:
        """A host buffer, pinned when there is a GPU unless pin=False (buffers only the CPU reads or writes)."""
        t = aligned_empty(numel, dtype)
        if self.pin and pin is not False:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), _capacity(t), 0))
            with self._lock:
                self._pinned[t.data_ptr()] = t
        storage, nbytes = t.untyped_storage(), numel * dtype.itemsize
        with self._lock:
            self._settle()
            self._live[storage._cdata] = (StorageWeakRef(storage), nbytes)
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return t

    def _settle(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(key)[1]

    def settle(self) -> int:
        """Forget the buffers that have been freed; the bytes alive now."""
        with self._lock:
            self._settle()
            return self.live_bytes

    def adopt(self, t: torch.Tensor, *, count: bool) -> torch.Tensor:
        """A buffer made elsewhere (a node's shared mapping, page-aligned): pinned like the others when there is
        a GPU, and counted in this ledger only if `count` (the node's bytes once, on its local rank 0)."""
        if self.pin:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(),
                                                                        0))
            with self._lock:
                self._pinned[t.data_ptr()] = t
        if count:
            storage = t.untyped_storage()
            with self._lock:
                self._settle()
                self._live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.live_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return t

    def release(self, t: torch.Tensor) -> None:
        with self._lock:
            kept = self._pinned.pop(t.data_ptr(), None)
        if kept is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(kept.data_ptr()))

    def close(self) -> None:
        for t in list(self._pinned.values()):
            self.release(t)


def _capacity(t: torch.Tensor) -> int:
    """Bytes from t's first byte to the end of its storage."""
    s = t.untyped_storage()
    return s.nbytes() - (t.data_ptr() - s.data_ptr())


class NvmeFiles:
    """Flat tensors as files in a private directory under the user's NVMe directory; removed by close().

    Reads bypass the page cache: with O_DIRECT into a 4 KiB-aligned buffer, split into a few requests in flight at
    once (one request at a time leaves an NVMe drive mostly idle), or, where O_DIRECT is refused (tmpfs, an
    unaligned buffer), with posix_fadvise(DONTNEED) first so the read still reaches the drive. Writes go through
    the page cache, are made durable (fdatasync) and then dropped from it (DONTNEED).

    shared=(world, run): the node's directory for the weight files its ranks share, made by local rank 0 under its
    --nvme-dir and used by every local rank whose --nvme-dir is the same directory (a rank given another one, a
    second drive, finds no node directory there and keeps private files: self.shared is then False); each rank
    holds a shared flock on it while it lives, and the last to close removes it (a later run reclaims it once
    every rank is dead). A shared file is rewritten in place, never truncated, since another rank may read it
    meanwhile (the same bytes: see the module docstring)."""

    def __init__(self, nvme_dir: str, *, requests: int = 4, shared: tuple[World, str] | None = None):
        self._owner, self.shared = None, shared is not None
        err = None
        try:
            os.makedirs(nvme_dir, exist_ok=True)
            if shared is None:
                reclaim_scratch(nvme_dir)
                self.root = self._locked(nvme_dir, f"{scratch_prefix()}{secrets.token_hex(4)}", fcntl.LOCK_EX)
            else:
                world, run = shared
                self.root = os.path.join(nvme_dir, f"blockfit-{run}-node{world.node}")
                if world.local_rank == 0:
                    self._locked(nvme_dir, os.path.basename(self.root), fcntl.LOCK_SH)
        except OSError as e:
            err = e
        if shared is not None:
            failed = failed_ranks(world, err is None)   # local rank 0 made it, or every rank learns why not
            if not failed and self._owner is None:
                try:
                    if os.path.isdir(self.root):
                        self._owner = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                        fcntl.flock(self._owner, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    else:   # another directory than local rank 0's: this rank's own files
                        self.shared = False
                        reclaim_scratch(nvme_dir)
                        self.root = self._locked(nvme_dir, f"{scratch_prefix()}{secrets.token_hex(4)}",
                                                 fcntl.LOCK_EX)
                except OSError as e:
                    err = e
            if failed and err is None:
                err = OSError(errno.EIO, f"rank {failed[0]} could not make it")
        if err is not None:
            raise UserError(f"cannot use NVMe directory '{nvme_dir}' ({err.strerror or err}).") from None
        self.nvme_dir = nvme_dir
        self.direct = hasattr(os, "O_DIRECT")
        self._io = ThreadPoolExecutor(max_workers=requests, thread_name_prefix="blockfit-nvme-io")
        self.requests = requests

    def _locked(self, parent: str, name: str, lock: int) -> str:
        """A new directory `name` under parent, locked before it gets its name: made under a name no reclaim
        looks at, locked, then renamed, so another rank's reclaim_scratch never takes it for a dead run's."""
        tmp = tempfile.mkdtemp(prefix=".new-", dir=parent)
        # Held while this process lives: a later run knows the directory is in use; once the process dies
        # (even by kill -9) the kernel drops the lock and the next run reclaims the directory.
        self._owner = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._owner, lock | fcntl.LOCK_NB)
        final = os.path.join(parent, name)
        os.rename(tmp, final)
        return final

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.bin")

    def _failed(self, key: str, action: str, e: OSError) -> UserError:
        """One paragraph for an NVMe scratch file that could not be written or read (raised on a worker thread,
        it reaches the main thread through the executor's futures)."""
        if e.errno == errno.ENOSPC:
            why = ("the drive is full (no space left on device); free space there or point --nvme-dir at a bigger "
                   "drive")
        elif e.errno == errno.ENOENT or isinstance(e, _ShortRead):
            why = ("the file was deleted or truncated while the run was using it; nothing else may touch the "
                   "run's scratch directory")
        else:
            why = e.strerror or str(e)
        return UserError(f"could not {action} NVMe scratch file '{self.path(key)}' under --nvme-dir "
                         f"'{self.nvme_dir}': {why}. Training stopped; the last checkpoint is intact, resume from "
                         f"it with --resume.")

    def write(self, key: str, src: torch.Tensor) -> None:
        """Write all of src, make it durable, then drop it from the page cache."""
        try:
            self._write(key, src)
        except OSError as e:
            raise self._failed(key, "write", e) from None

    def read(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Fill out (contiguous) from the file, from the drive, not the page cache."""
        try:
            return self._read(key, out)
        except OSError as e:
            raise self._failed(key, "read", e) from None

    def _write(self, key: str, src: torch.Tensor) -> None:
        view = memoryview(src.contiguous().view(torch.uint8).numpy())
        fd = os.open(self.path(key), os.O_WRONLY | os.O_CREAT | (0 if self.shared else os.O_TRUNC), 0o600)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def _read(self, key: str, out: torch.Tensor) -> torch.Tensor:
        nbytes = out.numel() * out.element_size()
        aligned = out.data_ptr() % BLOCK == 0 and _capacity(out) >= round_up(nbytes)
        if self.direct and aligned and nbytes:
            try:
                fd = os.open(self.path(key), os.O_RDONLY | os.O_DIRECT)
            except FileNotFoundError:
                raise
            except OSError:
                self.direct = False  # the filesystem refuses O_DIRECT: page cache dropped instead
            else:
                try:
                    raw = memoryview(torch.empty(0, dtype=torch.uint8).set_(
                        out.untyped_storage(), out.data_ptr() - out.untyped_storage().data_ptr(),
                        (round_up(nbytes),)).numpy())
                    step = round_up(max(1 << 20, -(-nbytes // self.requests)))
                    parts = [(o, min(o + step, round_up(nbytes))) for o in range(0, nbytes, step)]
                    for f in [self._io.submit(_pread, fd, raw, a, b, nbytes, key) for a, b in parts]:
                        f.result()
                    return out
                finally:
                    os.close(fd)
        fd = os.open(self.path(key), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            _pread(fd, memoryview(out.view(torch.uint8).numpy()), 0, nbytes, nbytes, key)
        finally:
            os.close(fd)
        return out

    def remove(self, key: str) -> None:
        try:
            os.remove(self.path(key))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._io.shutdown(wait=True)
        if self._owner is None:
            return
        if self.shared:  # the last rank out removes the node's directory: nobody else holds its lock then
            fcntl.flock(self._owner, fcntl.LOCK_UN)
            try:
                fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._owner)
                self._owner = None
                return
        shutil.rmtree(self.root, ignore_errors=True)
        os.close(self._owner)
        self._owner = None


class _ShortRead(OSError):
    """An NVMe scratch file ended before the bytes the run wrote there."""


def _pread(fd: int, view: memoryview, start: int, end: int, nbytes: int, key: str) -> None:
    """Read bytes [start, end) of the file into view[start:end]; the file ends at nbytes (a short read there is
    the end of file, not an error)."""
    done = start
    while done < min(end, nbytes):
        n = os.preadv(fd, [view[done:end]], done)
        if n <= 0:
            raise _ShortRead(errno.EIO, f"NVMe file for '{key}' is shorter than expected ({done} of {nbytes} bytes)")
        done += n


class StagingPool:
    """A few pinned buffers of the largest NVMe layer's size. A buffer goes back with the CUDA event of the copy
    that last read it; acquire() waits for that copy, so a buffer is never overwritten while a copy reads it."""

    def __init__(self, host: HostMemory, numel: int, dtype: torch.dtype, count: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(count):
            self._free.put((host.empty(numel, dtype), None))

    def acquire(self) -> torch.Tensor:
        buf, event = self._free.get()
        if buf is None:
            self._free.put((None, None))  # wake the next waiter too
            raise RuntimeError("the step was aborted")
        if event is not None:
            event.synchronize()
        return buf

    def abort(self) -> None:
        """Wake every waiter with an error (the step failed; nothing will give a buffer back)."""
        self._free.put((None, None))

    def release(self, buf: torch.Tensor, event=None) -> None:
        self._free.put((buf, event))


