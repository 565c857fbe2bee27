"""Tiered storage: where each layer's weights live, how bytes reach the device, and a ledger of device bytes.

Three tiers, as the plan names them:
  gpu   one flat buffer on the device per layer, resident for the whole run;
  cpu   one flat buffer per layer in pinned host memory, exactly the layer's size: ordinary memory registered
        with cudaHostRegister, not PyTorch's caching host allocator, which rounds every block up to a power of
        two (../shared/reference/hardware.md);
  nvme  one file per layer under --nvme-dir, read and written by the copy engine's NVMe threads through pinned,
        4 KiB-aligned staging buffers. Reads bypass the page cache (O_DIRECT, several requests in flight; where the
        filesystem refuses O_DIRECT, posix_fadvise DONTNEED first), so each read reaches the drive, as it does when
        host RAM is short, which is why the plan chose NVMe; writes are made durable, then dropped from the cache.

Every parameter of a layer is a view into its flat buffer, so a layer moves in one copy. Without CUDA the CPU
stands in for the device: "device" buffers are separate CPU tensors, and the same ledger (DeviceMeter) counts them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from planner.errors import UserError
from planner.memory import Tier
from runtime.scratch import reclaim_scratch, scratch_prefix


@dataclass(frozen=True, kw_only=True)
class Target:
    """The device the runtime computes on and the dtypes it uses there."""
    device: torch.device          # cuda:N, or cpu standing in for the device
    weight_dtype: torch.dtype     # bf16 on CUDA, fp32 on CPU (bitwise comparable with a plain PyTorch loop)
    align_numel: int = 1          # parameter offsets inside a flat buffer are multiples of this

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def detect(cls, *, force_cpu: bool = False) -> "Target":
        if torch.cuda.is_available() and not force_cpu:
            return cls(device=torch.device("cuda", torch.cuda.current_device()), weight_dtype=torch.bfloat16,
                       align_numel=64)  # 128-byte aligned views keep vectorised kernels on their fast path
        return cls(device=torch.device("cpu"), weight_dtype=torch.float32)


@dataclass(frozen=True, kw_only=True)
class FlatLayout:
    """Where each parameter of one layer sits inside its flat buffer (names as in layer.named_parameters())."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, layer: nn.Module, align: int = 1) -> "FlatLayout":
        names, shapes, offsets, at = [], [], [], 0
        for name, p in layer.named_parameters():
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(at)
            at += -(-p.numel() // align) * align
        return cls(names=tuple(names), shapes=tuple(shapes), offsets=tuple(offsets), numel=at)

    @property
    def params(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o:o + _numel(s)].view(s) for o, s in zip(self.offsets, self.shapes)]

    def flatten(self, tensors, out: torch.Tensor) -> torch.Tensor:
        """Copy tensors (in layout order) into `out`, casting; returns out."""
        for view, t in zip(self.views(out), tensors):
            view.copy_(t)
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bind(layer: nn.Module, layout: FlatLayout, flat: torch.Tensor | None, *, empty: torch.Tensor) -> None:
    """Point the layer's parameters at views of `flat`, or at `empty` (a 0-element device tensor) when unloaded."""
    views = layout.views(flat) if flat is not None else [empty] * len(layout.names)
    params = dict(layer.named_parameters())
    for name, view in zip(layout.names, views):
        params[name].data = view


class DeviceMeter:
    """The ledger of device bytes by class (weights, prefetch, master, moments, grads, activations, workspace).

    The copy engine books every operation's measured bytes in issue order, on the issuing thread: what an op
    allocates when it starts, what it holds only while it runs, what it frees when it ends. So the peak is
    deterministic and comparable, op for op, with the schedule's own replay (planner.schedule.memory_timeline).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.live: dict[str, int] = {}
        self.peak_bytes = 0

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    def book(self, cls: str, *, alloc: int = 0, transient: int = 0, free: int = 0) -> None:
        with self._lock:
            if alloc:
                self.live[cls] = self.live.get(cls, 0) + alloc
            self.peak_bytes = max(self.peak_bytes, self.live_bytes + transient)
            if free:
                self.live[cls] = self.live.get(cls, 0) - free

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.live_bytes


BLOCK = 4096   # O_DIRECT alignment of buffers, offsets and lengths


def _round_up(n: int, to: int = BLOCK) -> int:
    return -(-n // to) * to


def aligned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor starting on a 4 KiB boundary and owning whole 4 KiB blocks (for O_DIRECT reads)."""
    nbytes = _round_up(max(1, numel * dtype.itemsize))
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
    the page cache, are made durable (fdatasync) and then dropped from it (DONTNEED)."""

    def __init__(self, nvme_dir: str, *, requests: int = 4):
        try:
            os.makedirs(nvme_dir, exist_ok=True)
            reclaim_scratch(nvme_dir)
            self.root = tempfile.mkdtemp(prefix=scratch_prefix(), dir=nvme_dir)
            # Held while this process lives: a later run knows the directory is in use; once the process dies
            # (even by kill -9) the kernel drops the lock and the next run reclaims the directory.
            self._owner = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise UserError(f"cannot use NVMe directory '{nvme_dir}' ({e.strerror or e}).") from None
        self.nvme_dir = nvme_dir
        self.direct = hasattr(os, "O_DIRECT")
        self._io = ThreadPoolExecutor(max_workers=requests, thread_name_prefix="blockfit-nvme-io")
        self.requests = requests

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
        fd = os.open(self.path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
        aligned = out.data_ptr() % BLOCK == 0 and _capacity(out) >= _round_up(nbytes)
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
                        (_round_up(nbytes),)).numpy())
                    step = _round_up(max(1 << 20, -(-nbytes // self.requests)))
                    parts = [(o, min(o + step, _round_up(nbytes))) for o in range(0, nbytes, step)]
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
        shutil.rmtree(self.root, ignore_errors=True)
        if self._owner is not None:
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


class DeviceBuffers:
    """Where the copy engine's device copies of streamed layers come from. On CUDA, PyTorch's caching allocator.
    Without CUDA the same role needs a cache too: a fresh CPU tensor of a layer's size is fresh pages from the
    kernel, faulted in and zeroed on the first write (slower than the copy itself), so freed buffers are kept by
    size and handed out again."""

    def __init__(self, target: Target):
        self.target = target
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        if not self.target.cuda:
            with self._lock:
                free = self._free.get(numel)
                if free:
                    return free.pop()
        return torch.empty(numel, dtype=self.target.weight_dtype, device=self.target.device)

    def give(self, buf: torch.Tensor) -> None:
        if not self.target.cuda:
            with self._lock:
                self._free.setdefault(buf.numel(), []).append(buf)


class TieredStore:
    """Each layer's weights on its tier; the device copies of streamed layers are made by the copy engine."""

    def __init__(self, *, target: Target, layouts: list[FlatLayout], tiers: list[str], nvme_dir: str | None,
                 window_layers: int):
        self.target = target
        self.layouts = layouts
        self.tiers = tiers
        self.host = HostMemory(pin=target.cuda)
        self.meter = DeviceMeter()
        self.buffers = DeviceBuffers(target)
        self.empty = torch.empty(0, dtype=target.weight_dtype, device=target.device)
        self._resident: dict[int, torch.Tensor] = {}   # tier gpu
        self._pinned: dict[int, torch.Tensor] = {}     # tier cpu
        nvme_layers = [i for i, t in enumerate(tiers) if t == Tier.NVME]
        self.files = NvmeFiles(nvme_dir) if nvme_dir else None
        self.staging = None
        if nvme_layers:
            if self.files is None:
                raise UserError("the plan puts weights on NVMe; give a directory on the NVMe drive with --nvme-dir.")
            biggest = max(layouts[i].numel for i in nvme_layers)
            self.staging = StagingPool(self.host, biggest, target.weight_dtype, max(2, window_layers))

    def weight_bytes(self, layer: int) -> int:
        return self.layouts[layer].numel * self.target.weight_dtype.itemsize

    # -- placement --------------------------------------------------------------------------------------------

    def put(self, layer: int, flat: torch.Tensor) -> None:
        """Place a layer's weights (a flat CPU tensor in layout order, any float dtype) on its tier."""
        n, dt = self.layouts[layer].numel, self.target.weight_dtype
        tier = self.tiers[layer]
        if tier == Tier.GPU:
            if layer not in self._resident:
                self._resident[layer] = torch.empty(n, dtype=dt, device=self.target.device)
            self._resident[layer].copy_(flat)
        elif tier == Tier.CPU:
            if layer not in self._pinned:
                self._pinned[layer] = self.host.empty(n, dt)
            self._pinned[layer].copy_(flat)
        else:
            self.files.write(f"weights-L{layer}", flat.to(dt))

    def get(self, layer: int) -> torch.Tensor:
        """A CPU copy of a layer's flat weights, from whichever tier holds them (checkpoints, state init)."""
        tier = self.tiers[layer]
        if tier == Tier.GPU:
            return self._resident[layer].to("cpu", copy=True)
        if tier == Tier.CPU:
            return self._pinned[layer].clone()
        return self.files.read(f"weights-L{layer}", self.host.empty(self.layouts[layer].numel,
                                                                    self.target.weight_dtype, pin=False))

    def source(self, layer: int) -> torch.Tensor:
        """The layer's flat weights where they live (device or pinned), or a host copy read from NVMe."""
        tier = self.tiers[layer]
        if tier == Tier.GPU:
            return self._resident[layer]
        return self._pinned[layer] if tier == Tier.CPU else self.get(layer)

    def resident(self, layer: int) -> torch.Tensor:
        return self._resident[layer]

    def pinned(self, layer: int) -> torch.Tensor:
        return self._pinned[layer]

    def resident_bytes(self) -> int:
        return sum(self.weight_bytes(i) for i in self._resident)

    # -- NVMe -------------------------------------------------------------------------------------------------

    def read_weights(self, layer: int) -> torch.Tensor:
        """NVMe -> a pinned staging buffer (blocks while all are in use); give it back with release_staging."""
        buf = self.staging.acquire()
        self.files.read(f"weights-L{layer}", buf[:self.layouts[layer].numel])
        return buf

    def release_staging(self, buf: torch.Tensor, event=None) -> None:
        self.staging.release(buf, event)

    def write_weights(self, layer: int, flat: torch.Tensor) -> None:
        self.files.write(f"weights-L{layer}", flat)

    def close(self) -> None:
        self._resident.clear()
        self._pinned.clear()
        self.staging = None
        self.host.close()
        if self.files is not None:
            self.files.close()
