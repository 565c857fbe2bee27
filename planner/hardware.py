"""Hardware: the GPU catalog (one JSON file per GPU, sources inside), the host side, and the links between tiers.

This is the one place that knows bandwidths. Everything that asks "how long does moving N bytes take" asks a
`Link`; everything that asks "how long does this compute take" asks `Hardware.compute_seconds`. The ILP, the
schedule's costs and the simulator all read these, so their numbers can be compared.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from planner.errors import UserError, check_positive, closest, read_json
from planner.units import GB, GIB, size_gib

GPU_DIR = os.path.join(os.path.dirname(__file__), "catalog", "gpus")

# Bytes of device memory traffic per parameter of one device-tier AdamW step as the runtime runs it
# (runtime.optim.step_layer, then the engine's copy into the resident weights: fp32 master, moments and sqrt
# workspace, bf16 gradient and weights, weight decay 0), each elementwise pass reading its operands and writing
# its result once:
#   gradient to fp32 2 + 4; exp_avg lerp 4 + 4 + 4; exp_avg_sq x beta2 4 + 4; addcmul 4 + 4 + 4; sqrt 4 + 4;
#   / bias correction 4 + 4; + eps 4 + 4; addcdiv into the master 4 + 4 + 4 + 4; master to bf16 4 + 2;
#   into the resident weights 2 + 2.
# A single fused kernel would move about 30 (read 2 + 12 + 2, write 12 + 2); the runtime's foreach passes move
# 88. A calibrated profile times the step instead (GPU.adam_params_per_s).
DEVICE_ADAM_TRAFFIC_BYTES = 88


def gpu_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(GPU_DIR) if f.endswith(".json"))


@dataclass(frozen=True, kw_only=True)
class GPU:
    id: str
    name: str
    vram_gib: float
    memory_gbps: float          # device memory bandwidth
    bf16_tflops: float          # dense, FP32 accumulate
    h2d_gbps: float             # typical achieved pinned host-to-device
    d2h_gbps: float             # typical achieved pinned device-to-host
    pcie: str = ""
    nvlink_gbps: float = 0.0
    price_per_hour: float | None = None
    spot_price_per_hour: float | None = None
    sources: dict = field(default_factory=dict)
    # 0: copies, collectives and the host's optimizer run beside compute (copy engines, a NIC, the host's cores).
    # k > 0: the "device" is k CPU cores that also run them (a CPU standing in for a GPU: `blockfit calibrate`
    # without CUDA), so their busy time is taken from compute's (simulator.engine.shared_core_durations).
    shared_cores: int = 0
    # With shared_cores > 0: wire bytes (planner.cluster.wire_bytes, schedule bytes) a collective's threads move
    # per second of CPU time they take (gloo's sends, receives and sums, as `blockfit calibrate` measured them
    # under torchrun); the rest of a collective's duration is waiting for the other ranks and the socket, which
    # takes nothing from compute. 0: not measured, a collective's whole duration is taken from compute.
    collective_cpu_gbps: float = 0.0
    # The runtime's device-tier AdamW step, parameters per second, as `blockfit calibrate` measured it; 0: not
    # measured, priced as memory traffic (DEVICE_ADAM_TRAFFIC_BYTES per parameter at memory_gbps).
    adam_params_per_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Host:
    ram_gib: float = 64.0                 # host RAM usable for pinned tiers
    nvme_gib: float = 0.0                 # NVMe capacity for the plan; 0 means no NVMe tier
    nvme_read_gbps: float = 3.7           # async I/O on one Gen4 drive (hardware.md)
    nvme_write_gbps: float = 3.2
    nvme_tbw: float = 1200.0              # the drive's endurance, TB (10^12 bytes) written (planner.wear)
    cpu_adam_params_per_s: float = 0.2e9  # torch's CPU AdamW (hardware.md); calibrate measures ours
    pageable_factor: float = 0.5          # pageable copies run at this fraction of pinned (unverified)
    # The host memory system's bandwidth, GB/s, shared by every copy to and from every GPU of the node: eight
    # cards each pulling 25 GB/s over PCIe ask 200 GB/s of it (hardware.md, "Clusters"). Default: an 8-channel
    # DDR4-3200 server socket, 8 x 3200 MT/s x 8 B = 204.8 GB/s peak (JEDEC DDR4 arithmetic), of which STREAM-like
    # copies reach about three quarters (unverified; a desktop's dual-channel DDR5-5600 peaks at 89.6 GB/s).
    mem_gbps: float = 150.0
    # Bus bandwidth of an all-reduce between this node's GPUs (nccl-tests convention), GB/s, as `blockfit
    # calibrate` measured it under torchrun; 0: not measured (planner.cluster.intra_link's figure is used).
    collective_gbps: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    """Achieved fraction of peak. Defaults are conservative guesses; `blockfit calibrate` measures them."""
    matmul_max: float = 0.70             # large bf16 GEMMs reach ~70% of dense peak
    matmul_half_tokens: float = 512.0    # at this many tokens per GEMM, efficiency is half of matmul_max
    memory: float = 0.80                 # of memory_gbps for elementwise and norm kernels
    link: float = 1.0                    # multiplier on the catalog's achieved link figures


@dataclass(frozen=True, kw_only=True)
class Link:
    """A one-directional path between two tiers: io_seconds(n) = latency + n / bandwidth."""
    name: str
    gbps: float
    latency_s: float = 10e-6

    def io_seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / (self.gbps * GB)


@dataclass(frozen=True, kw_only=True)
class Hardware:
    gpu: GPU
    host: Host = Host()
    eff: Efficiency = Efficiency()
    calibrated: bool = False

    @property
    def vram_bytes(self) -> int:
        return int(self.gpu.vram_gib * GIB)

    def link(self, stream: str) -> Link:
        """The link behind a schedule stream: h2d, d2h, nvme_read, nvme_write."""
        g, h = self.gpu, self.host
        gbps = {"h2d": g.h2d_gbps * self.eff.link, "d2h": g.d2h_gbps * self.eff.link,
                "nvme_read": h.nvme_read_gbps, "nvme_write": h.nvme_write_gbps}[stream]
        return Link(name=stream, gbps=gbps)

    def matmul_seconds(self, flops: float, tokens: float) -> float:
        """GEMM time: peak x an efficiency that grows with the tokens per GEMM (small GEMMs underuse the GPU)."""
        if flops <= 0:
            return 0.0
        e = self.eff.matmul_max * tokens / (tokens + self.eff.matmul_half_tokens)
        return flops / (self.gpu.bf16_tflops * 1e12 * max(e, 1e-3))

    def memory_seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else nbytes / (self.gpu.memory_gbps * GB * self.eff.memory)

    def adam_seconds(self, params: float, tier: str) -> float:
        """One AdamW step over `params`: on the GPU at its calibrated params/s, else memory-bound at
        DEVICE_ADAM_TRAFFIC_BYTES per parameter (the runtime's passes, derived there); on the CPU at the
        calibrated or catalog params/s."""
        if tier == "gpu":
            if self.gpu.adam_params_per_s > 0:
                return params / self.gpu.adam_params_per_s
            return self.memory_seconds(params * DEVICE_ADAM_TRAFFIC_BYTES)
        return params / self.host.cpu_adam_params_per_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        return cls(gpu=GPU(**d["gpu"]), host=Host(**d.get("host", {})), eff=Efficiency(**d.get("eff", {})),
                   calibrated=bool(d.get("calibrated", False)))


def load_gpu(name: str) -> GPU:
    path = os.path.join(GPU_DIR, f"{name}.json")
    if not isinstance(name, str) or not name.strip() or os.sep in name or not os.path.isfile(path):
        raise UserError(f"unknown GPU '{name}'. Known GPUs: {', '.join(gpu_names())}{closest(name, gpu_names())}.")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    sources = {k: raw.pop(k) for k in list(raw) if k.endswith("_source")}
    known = {f.name for f in dataclasses.fields(GPU)}
    return GPU(sources=sources, **{k: v for k, v in raw.items() if k in known})


def load_hardware_file(path: str) -> Hardware:
    """A hardware profile written by `blockfit calibrate` (or by hand)."""
    raw = read_json(path, "hardware profile", f"; write one with `blockfit calibrate --out {path}`")
    try:
        hw = Hardware.from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"hardware profile '{path}' is not a valid hardware profile ({type(e).__name__}: {e}).") \
            from None
    check_hardware(hw, f"hardware profile '{path}'")
    return hw


# fields that must be finite and positive (rates divide sizes; a zero or negative one makes time infinite or
# negative), and those that must be finite and >= 0
_POSITIVE = {"gpu": ("vram_gib", "memory_gbps", "bf16_tflops", "h2d_gbps", "d2h_gbps"),
             "host": ("ram_gib", "nvme_read_gbps", "nvme_write_gbps", "cpu_adam_params_per_s", "pageable_factor",
                      "nvme_tbw", "mem_gbps"),
             "eff": ("matmul_max", "memory", "link")}
_NON_NEGATIVE = {"gpu": ("nvlink_gbps", "adam_params_per_s", "collective_cpu_gbps"),
                 "host": ("nvme_gib", "collective_gbps"), "eff": ("matmul_half_tokens",)}
_UPPER = {"vram_gib": 1 << 16, "ram_gib": 1 << 22, "nvme_gib": 1 << 30, "matmul_max": 1.0, "memory": 1.0,
          "pageable_factor": 1.0}


def check_hardware(hw: Hardware, where: str = "hardware") -> None:
    """One validator for hardware figures, from a profile file or a plan: every rate finite and positive, every
    capacity finite and non-negative, efficiencies at most 1, prices absent or >= 0."""
    for part, names in list(_POSITIVE.items()) + list(_NON_NEGATIVE.items()):
        obj = getattr(hw, part)
        for name in names:
            v = getattr(obj, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > 0 if names is _POSITIVE.get(part) else v >= 0) and v <= _UPPER.get(name, 1e15)
            if not ok:
                want = "positive" if names is _POSITIVE.get(part) else "non-negative"
                raise UserError(f"{where}: {part}.{name} must be a finite {want} number"
                                f"{f' of at most {_UPPER[name]}' if name in _UPPER else ''}, got {v!r}.")
    k = hw.gpu.shared_cores
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 1 << 16:
        raise UserError(f"{where}: gpu.shared_cores must be a whole number of cores, 0 for a GPU, got {k!r}.")
    for name in ("price_per_hour", "spot_price_per_hour"):
        v = getattr(hw.gpu, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                              or v < 0):
            raise UserError(f"{where}: gpu.{name} must be a non-negative number or null, got {v!r}.")
    if not isinstance(hw.gpu.id, str) or not isinstance(hw.gpu.name, str):
        raise UserError(f"{where}: gpu.id and gpu.name must be strings.")


def make_hardware(*, gpu: str | None = None, hardware_file: str | None = None, vram_gib: float | str | None = None,
                  host_ram_gib: float | str | None = None, nvme_gib: float | str | None = None,
                  pcie_gbps: float | None = None, nvme_read_gbps: float | None = None,
                  nvme_write_gbps: float | None = None, cpu_adam_params_per_s: float | None = None,
                  nvme_tbw: float | None = None) -> Hardware:
    """Catalog GPU or a calibrated profile, with the command line's overrides applied (validated here)."""
    hw = load_hardware_file(hardware_file) if hardware_file is not None else \
        Hardware(gpu=load_gpu("rtx4090" if gpu is None else gpu))
    return with_overrides(hw, vram_gib=vram_gib, host_ram_gib=host_ram_gib, nvme_gib=nvme_gib, pcie_gbps=pcie_gbps,
                          nvme_read_gbps=nvme_read_gbps, nvme_write_gbps=nvme_write_gbps,
                          cpu_adam_params_per_s=cpu_adam_params_per_s, nvme_tbw=nvme_tbw)


def with_overrides(hw: Hardware, *, vram_gib: float | str | None = None, host_ram_gib: float | str | None = None,
                   nvme_gib: float | str | None = None, pcie_gbps: float | None = None,
                   nvme_read_gbps: float | None = None, nvme_write_gbps: float | None = None,
                   cpu_adam_params_per_s: float | None = None, nvme_tbw: float | None = None) -> Hardware:
    """`hw` with the command line's overrides applied (validated here); None leaves a figure as it is.
    Sizes are GiB, or strings with a unit (planner.units: `24`, `24GiB`, `2TB`)."""
    vram_gib = size_gib("--vram", vram_gib, upper_gib=4096)
    host_ram_gib = size_gib("--host-ram", host_ram_gib, upper_gib=65536)
    nvme_gib = size_gib("--nvme", nvme_gib, allow_zero=True, upper_gib=10**6)
    check_positive("--pcie-gbps", pcie_gbps, upper=1000)
    check_positive("--nvme-read-gbps", nvme_read_gbps, upper=1000)
    check_positive("--nvme-write-gbps", nvme_write_gbps, upper=1000)
    check_positive("--cpu-adam", cpu_adam_params_per_s, upper=1e12)
    check_positive("--nvme-tbw", nvme_tbw, upper=1e6)
    g, h = hw.gpu, hw.host
    if vram_gib is not None:
        g = dataclasses.replace(g, vram_gib=vram_gib)
    if pcie_gbps is not None:
        g = dataclasses.replace(g, h2d_gbps=pcie_gbps, d2h_gbps=pcie_gbps)
    h = dataclasses.replace(
        h, **{k: v for k, v in dict(ram_gib=host_ram_gib, nvme_gib=nvme_gib, nvme_read_gbps=nvme_read_gbps,
                                    nvme_write_gbps=nvme_write_gbps,
                                    cpu_adam_params_per_s=cpu_adam_params_per_s,
                                    nvme_tbw=nvme_tbw).items() if v is not None})
    return dataclasses.replace(hw, gpu=g, host=h)
