"""Tiered storage: where each layer's weights live, how bytes reach the device, and a ledger of device bytes.

Three tiers, as the plan names them:
  gpu   one flat buffer on the device per layer, resident for the whole run;
  cpu   one flat buffer per layer in pinned host memory, exactly the layer's size (runtime.hostio.HostMemory);
  nvme  one file per layer under --nvme-dir, read and written by the copy engine's NVMe threads through pinned,
        4 KiB-aligned staging buffers (runtime.hostio.NvmeFiles and StagingPool: O_DIRECT reads, durable writes).

Every parameter of a layer is a view into its flat buffer, so a layer moves in one copy. Without CUDA the CPU
stands in for the device: "device" buffers are separate CPU tensors, and the same ledger (DeviceMeter) counts them.

With several ranks on a node (World.local_size > 1) the cpu tier is one buffer in host shared memory for the whole
node (runtime.nodeshare.SharedHostBuffer) and the nvme tier one directory of files for the node
(runtime.hostio.NvmeFiles(shared=)): local rank 0 writes the initial weights there alone, the others wait for it
at placed(). The optimizer's NVMe state stays in each rank's own scratch directory (a rank's shard is its own).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from planner.errors import UserError
from planner.memory import Tier
from runtime.dist import SINGLE, World, failed_ranks, run_id
from runtime.hostio import HostMemory, NvmeFiles, StagingPool, round_up
from runtime.nodeshare import SharedHostBuffer


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
                 window_layers: int, world: World = SINGLE):
        self.target = target
        self.layouts = layouts
        self.tiers = tiers
        self.world = world
        self._placing = world.local_size > 1   # until placed(): only local rank 0 writes the node's shared tiers
        self.host = HostMemory(pin=target.cuda)
        self.meter = DeviceMeter()
        self.buffers = DeviceBuffers(target)
        self.empty = torch.empty(0, dtype=target.weight_dtype, device=target.device)
        self._resident: dict[int, torch.Tensor] = {}   # tier gpu
        self._pinned: dict[int, torch.Tensor] = {}     # tier cpu
        nvme_layers = [i for i, t in enumerate(tiers) if t == Tier.NVME]
        cpu_layers = [i for i, t in enumerate(tiers) if t == Tier.CPU]
        shares = world.local_size > 1
        run = run_id(world) if shares else None
        self.shared = None
        if shares and cpu_layers:
            offsets, at = {}, 0
            for i in cpu_layers:   # page-aligned layers in one mapping
                offsets[i], at = at, at + round_up(self.weight_bytes(i))
            self.shared = SharedHostBuffer(self.host, at, world=world, run=run)
            for i in cpu_layers:
                self._pinned[i] = self.shared.view(offsets[i], layouts[i].numel, target.weight_dtype)
        self.files = NvmeFiles(nvme_dir) if nvme_dir else None
        self.weight_files = NvmeFiles(nvme_dir, shared=(world, run)) if nvme_dir and shares and nvme_layers \
            else self.files
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
            if self._writes(self.shared is not None):
                self._pinned[layer].copy_(flat)
        elif self._writes(self.weight_files.shared):
            self.weight_files.write(f"weights-L{layer}", flat.to(dt))

    def _writes(self, shared: bool) -> bool:
        """Whether this rank writes a tier now: always, except local ranks > 0 to the node's shared copy during
        the first placement (local rank 0 writes it once)."""
        return not (self._placing and shared and self.world.local_rank > 0)

    def placed(self) -> None:
        """The initial weights are placed: the ranks of a node wait here until local rank 0 has written the
        node's shared copy, and from now on every rank writes its (identical) updates itself."""
        if self._placing and failed_ranks(self.world, True):
            raise UserError("another rank failed while placing the initial weights.")
        self._placing = False

    def get(self, layer: int) -> torch.Tensor:
        """A CPU copy of a layer's flat weights, from whichever tier holds them (checkpoints, state init)."""
        tier = self.tiers[layer]
        if tier == Tier.GPU:
            return self._resident[layer].to("cpu", copy=True)
        if tier == Tier.CPU:
            return self._pinned[layer].clone()
        return self.weight_files.read(f"weights-L{layer}", self.host.empty(self.layouts[layer].numel,
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
        self.weight_files.read(f"weights-L{layer}", buf[:self.layouts[layer].numel])
        return buf

    def release_staging(self, buf: torch.Tensor, event=None) -> None:
        self.staging.release(buf, event)

    def write_weights(self, layer: int, flat: torch.Tensor) -> None:
        self.weight_files.write(f"weights-L{layer}", flat)

    def close(self) -> None:
        self._resident.clear()
        self._pinned.clear()
        self.staging = None
        self.host.close()
        self.shared = None
        if self.files is not None:
            self.files.close()
        if self.weight_files is not None and self.weight_files is not self.files:
            self.weight_files.close()
