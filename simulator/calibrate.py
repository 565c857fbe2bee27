"""Calibration: measure this machine and write a Hardware profile that `plan --hardware` and the simulator read.

What is measured, and how it maps onto planner.hardware:
  - host-to-device and device-to-host GB/s by transfer size, pinned and pageable (the largest size's pinned
    rate becomes h2d_gbps / d2h_gbps, pageable/pinned the pageable_factor). Without CUDA the CPU stands in as
    the device, so these are memcpy rates between two host buffers and pinned equals pageable;
  - NVMe read and write GB/s of a file in --dir with the page cache bypassed: O_DIRECT with page-aligned
    (mmap) buffers where the file system takes it, else plain I/O with fsync after writing and
    posix_fadvise(DONTNEED) before reading;
  - CPU AdamW params/s: torch.optim.AdamW on fp32 tensors; the foreach implementation (the one runtime/optim.py
    mirrors) is used, the single-tensor and fused ones are recorded beside it;
  - matmul TFLOPS at the model's GEMM shapes (tokens x hidden @ hidden x ffn) for several token counts, fitted
    to the cost model's curve achieved(T) = A * T / (T + half);
  - a real decoder layer (planner.llama) forward and backward at several token counts: its seconds less the
    memory-bound share the cost model prices separately, over the FLOPs the profile counts, fitted to the same
    curve. This fit (fit="layer", the default) sets bf16_tflops = A with matmul_max 1.0 and matmul_half_tokens
    = half, so attention, norms and framework overhead are in the rate the simulator prices a layer with; the
    bare GEMM fit (fit="gemm") is the alternative, and both are recorded;
  - memory-bound GB/s of an elementwise add (memory_gbps, with efficiency 1.0).
When the CPU stands in for the device the runtime keeps weights and activations in fp32 (runtime/store.py,
Target), twice the bf16 bytes the schedule counts, so link and memory rates are scaled by 2 / itemsize to price
schedule bytes; the scale is recorded. The profile is Hardware.to_dict() with calibrated=True plus a
"measurements" section with every raw figure (Hardware.from_dict ignores it). `quick=True` uses small sizes:
a few seconds, for tests.
"""
from __future__ import annotations

import json
import mmap
import os
import platform
import socket
import tempfile
import time

from planner.errors import UserError
from planner.hardware import GB, GIB, GPU, Efficiency, Hardware, Host
from planner.models import load_model_config
from planner.plan import write_atomic


def _now(dev: str) -> float:
    if dev == "cuda":
        import torch
        torch.cuda.synchronize()
    return time.perf_counter()


def _time(fn, dev: str, repeats: int, budget_s: float = 2.0) -> float:
    """Best seconds of fn() over up to `repeats` calls after one warm-up call, fewer when they would take more
    than `budget_s`: the rate the hardware can reach (a median would fold in whatever else the machine was
    doing)."""
    t0 = _now(dev)
    fn()
    warm = _now(dev) - t0
    best = float("inf")
    for _ in range(max(1, min(repeats, int(budget_s / max(warm, 1e-9))))):
        t0 = _now(dev)
        fn()
        best = min(best, _now(dev) - t0)
    return best


def measure_links(dev: str, sizes: list[int], repeats: int) -> dict:
    """GB/s per direction, memory kind and transfer size."""
    import torch
    out = {"h2d": {"pinned": {}, "pageable": {}}, "d2h": {"pinned": {}, "pageable": {}}}
    for n in sizes:
        dev_buf = torch.empty(n, dtype=torch.uint8, device=dev)
        dev_buf.fill_(1)
        for kind in ("pinned", "pageable"):
            host = torch.empty(n, dtype=torch.uint8, pin_memory=(kind == "pinned" and dev == "cuda"))
            host.fill_(2)
            nb = kind == "pinned"
            t = _time(lambda d=dev_buf, h=host, nb=nb: d.copy_(h, non_blocking=nb), dev, repeats)
            out["h2d"][kind][n] = n / t / GB
            t = _time(lambda d=dev_buf, h=host, nb=nb: h.copy_(d, non_blocking=nb), dev, repeats)
            out["d2h"][kind][n] = n / t / GB
    return out


def measure_nvme(directory: str, nbytes: int, block: int = 4 << 20) -> dict:
    """Write then read a file of `nbytes` in `directory`, bypassing the page cache; GB/s and the method used."""
    if not os.path.isdir(directory):
        raise UserError(f"--dir '{directory}' is not a directory.")
    if not os.access(directory, os.W_OK):
        raise UserError(f"--dir '{directory}' is not writable.")
    nbytes = max(block, nbytes // block * block)
    buf = mmap.mmap(-1, block)          # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(block))
    fd, path = tempfile.mkstemp(dir=directory, prefix=".blockfit-calibrate-")
    os.close(fd)
    direct = hasattr(os, "O_DIRECT")
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | (os.O_DIRECT if direct else 0))
        except OSError:
            direct = False
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        t0 = time.perf_counter()
        try:
            for _ in range(nbytes // block):
                os.write(fd, buf)
        except OSError:            # some file systems accept O_DIRECT at open and refuse the write
            if not direct:
                raise
            os.close(fd)
            direct = False
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            t0 = time.perf_counter()
            for _ in range(nbytes // block):
                os.write(fd, buf)
        os.fsync(fd)
        write_s = time.perf_counter() - t0
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        got = 0
        while got < nbytes:
            k = os.readv(fd, [buf])
            if k <= 0:
                break
            got += k
        read_s = time.perf_counter() - t0
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot measure NVMe in '{directory}': {e.strerror}.") from None
    finally:
        buf.close()
        try:
            os.unlink(path)
        except OSError:
            pass
    method = "O_DIRECT" if direct else ("fsync + posix_fadvise(DONTNEED)" if hasattr(os, "posix_fadvise")
                                        else "fsync (page cache not bypassed on reads)")
    return {"write_gbps": nbytes / write_s / GB, "read_gbps": got / read_s / GB, "bytes": nbytes,
            "method": method, "dir": os.path.abspath(directory)}


def measure_adam(params: int, repeats: int) -> dict:
    """CPU AdamW parameters per second, torch's default implementation and the fused one."""
    import torch
    out = {}
    flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for impl, kw in flags.items():
        # a layer's worth of tensors of a few sizes, as a block's parameters are
        ps = [torch.nn.Parameter(torch.randn(n)) for n in (params // 2, params // 4, params // 4)]
        for p in ps:
            p.grad = torch.randn(p.numel())
        try:
            opt = torch.optim.AdamW(ps, lr=1e-4, **kw)
            t = _time(opt.step, "cpu", repeats)
        except (RuntimeError, TypeError):
            continue
        out[impl] = params / t
    return out


def _gemm_tokens(h: int, ffn: int, dev: str, quick: bool) -> list[int]:
    """Token counts whose GEMM stays within a time budget on this device, at least four."""
    budget = (2e13 if dev == "cuda" else 2e10) / (5 if quick else 1)
    sizes = (1, 4, 16, 64, 256, 1024, 4096, 16384)
    ts = [t for t in sizes if 2 * t * h * ffn <= budget][-6:]
    return ts if len(ts) >= 4 else list(sizes[:4])


def measure_matmul(dev: str, dtype: str, h: int, ffn: int, quick: bool) -> list[tuple[int, float]]:
    """(tokens, achieved TFLOPS) of [tokens, h] @ [h, ffn] in `dtype`."""
    import torch
    dt = getattr(torch, dtype)
    w = torch.randn(h, ffn, device=dev).to(dt)
    out = []
    for t in _gemm_tokens(h, ffn, dev, quick):
        x = torch.randn(t, h, device=dev).to(dt)
        s = _time(lambda x=x: torch.matmul(x, w), dev, 3 if quick else 5)
        out.append((t, 2 * t * h * ffn / s / 1e12))
    return out


def fit_matmul(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(A, half) of achieved(T) = A * T / (T + half), by least squares on 1/achieved = 1/A + (half/A) / T."""
    xs = [1.0 / t for t, _ in points]
    ys = [1.0 / a for _, a in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    c0 = my - c1 * mx
    if c0 <= 0 or c1 < 0:   # noise: no saturation visible; take the best point and no size penalty
        return max(a for _, a in points), 0.0
    return 1.0 / c0, c1 / c0


def measure_layer(cfg, dev: str, dtype: str, quick: bool, repeats: int, seq: int = 512) -> list[dict]:
    """Seconds of one decoder layer's forward + backward (weights trainable) at micro-batches 1, 2, 4, ... of
    sequence `seq`, with the FLOPs and memory-bound bytes the profile (so the schedule) counts for them."""
    import torch

    from planner.costs import layer_sizes
    from planner.llama import DecoderLayer, init_weights
    from planner.profile import profile_model
    lp = profile_model(cfg).layers[1]
    dt = getattr(torch, dtype)
    with torch.device(dev):
        layer = DecoderLayer(cfg)
    layer = layer.to(dt)
    init_weights(layer)
    budget = (2e13 if dev == "cuda" else 2e10) / (5 if quick else 1)
    s_max = min(cfg.max_seq, seq)
    shapes = [(1, s) for s in (16, 32, 64, 128, 256) if s < s_max] + [(b, s_max) for b in (1, 2, 4, 8, 16)]
    sized = sorted(((b, s, layer_sizes(lp, b, s)) for b, s in shapes), key=lambda x: x[2].fwd_flops + x[2].bwd_flops)
    fits = [x for x in sized if x[2].fwd_flops + x[2].bwd_flops <= budget]
    at_seq = [x for x in fits if x[1] == s_max]
    # the asked sequence when it gives three sizes; else the largest shapes within the budget; else the smallest
    fits = at_seq if len(at_seq) >= 3 else fits[-5:] if len(fits) >= 3 else sized[:3]
    out = []
    for b, s, sz in fits:
        x = torch.randn(b, s, cfg.hidden, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn_like(x)
        sec = _time(lambda x=x, g=g: layer(x).backward(g), dev, repeats)
        out.append({"tokens": b * s, "seq": s, "seconds": sec, "flops": sz.fwd_flops + sz.bwd_flops,
                    "traffic_bytes": 3 * sz.traffic_bytes})   # backward moves twice the forward's (schedule.py)
    return out


def fit_layer(points: list[dict], memory_gbps: float) -> tuple[float, float]:
    """(A, half) such that flops / (A * T / (T + half)) + traffic / memory rate = the measured seconds."""
    rates = []
    for p in points:
        compute = max(p["seconds"] - p["traffic_bytes"] / (memory_gbps * GB), 0.2 * p["seconds"])
        rates.append((p["tokens"], p["flops"] / compute / 1e12))
    return fit_matmul(rates)


def measure_memory(dev: str, nbytes: int, repeats: int) -> float:
    """GB/s of z = x + y on fp32 tensors (two reads and a write)."""
    import torch
    n = nbytes // 4
    x, y, z = (torch.ones(n, device=dev) for _ in range(3))
    t = _time(lambda: torch.add(x, y, out=z), dev, repeats)
    return 3 * n * 4 / t / GB


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _ram_gib() -> float:
    try:
        import psutil
        return psutil.virtual_memory().total / GIB
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def calibrate(*, directory: str | None = None, quick: bool = False, model: str = "7b", dtype: str | None = None,
              device: str | None = None, fit: str = "layer", seq: int = 512, log=None) -> tuple[Hardware, dict]:
    """Measure everything; (the Hardware profile, the raw measurements)."""
    import torch
    say = log or (lambda _msg: None)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here.")
    dtype = dtype or ("bfloat16" if dev == "cuda" else "float32")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype must be bfloat16, float16 or float32, got '{dtype}'.")
    if fit not in ("layer", "gemm"):
        raise UserError(f"--fit must be layer or gemm, got '{fit}'.")
    cfg = load_model_config(model)
    started = time.perf_counter()
    sizes = [1 << 20, 16 << 20] if quick else [1 << 20, 16 << 20, 64 << 20, 256 << 20]
    reps = 3 if quick else 5
    say(f"device: {dev}; link rates by size ({', '.join(f'{s >> 20} MiB' for s in sizes)}) ...")
    links = measure_links(dev, sizes, reps)
    say("NVMe ...")
    nvme = measure_nvme(directory or tempfile.gettempdir(), (32 << 20) if quick else (512 << 20))
    say("CPU AdamW ...")
    adam = measure_adam((4 << 20) if quick else (16 << 20), reps)
    say(f"matmul at {cfg.name}'s GEMM shape ({cfg.hidden} x {cfg.ffn}), {dtype} ...")
    mm = measure_matmul(dev, dtype, cfg.hidden, cfg.ffn, quick)
    gemm_fit = fit_matmul(mm)
    say("memory bandwidth ...")
    mem = measure_memory(dev, (64 << 20) if quick else (256 << 20), reps)
    big = sizes[-1]
    scale = 2 / {"bfloat16": 2, "float16": 2, "float32": 4}[dtype] if dev == "cpu" else 1.0
    h2d, d2h = links["h2d"]["pinned"][big] * scale, links["d2h"]["pinned"][big] * scale
    mem *= scale
    say(f"a {cfg.name} decoder layer, forward and backward ...")
    layer_pts = measure_layer(cfg, dev, dtype, quick, reps, seq)
    layer_fit = fit_layer(layer_pts, mem)
    peak, half = layer_fit if fit == "layer" else gemm_fit
    pageable = links["h2d"]["pageable"][big] / h2d if h2d > 0 else 1.0
    ram = _ram_gib()
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, vram, host_ram = props.name, props.total_memory / GIB, ram
    else:  # one memory plays both tiers: half for the "device", half for the host
        name, vram, host_ram = f"{_cpu_name()} (CPU as the device)", ram / 2, ram / 2
    nvme_gib = 0.0
    if directory:
        st = os.statvfs(directory)
        nvme_gib = st.f_bavail * st.f_frsize / GIB
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    gpu = GPU(id=f"calibrated-{dev}", name=name, vram_gib=round(vram, 2), memory_gbps=mem, bf16_tflops=peak,
              h2d_gbps=h2d, d2h_gbps=d2h, pcie="", sources={
                  "calibrated": f"blockfit calibrate on {socket.gethostname()} at {stamp}, device {dev}",
                  "bf16_tflops": f"fitted asymptote of {dtype} " + (f"{cfg.name} decoder layers" if fit == "layer"
                                                                    else f"matmul at {cfg.name}'s GEMM shape"),
                  "h2d_gbps": "memcpy between host buffers (no CUDA)" if dev == "cpu" else
                              f"pinned copies of {big >> 20} MiB"})
    adam_rate = adam.get("foreach") or adam.get("single") or 0.2e9
    host = Host(ram_gib=round(host_ram, 2), nvme_gib=round(nvme_gib, 2), nvme_read_gbps=nvme["read_gbps"],
                nvme_write_gbps=nvme["write_gbps"], cpu_adam_params_per_s=adam_rate,
                pageable_factor=min(1.0, pageable))
    hw = Hardware(gpu=gpu, host=host, eff=Efficiency(matmul_max=1.0, matmul_half_tokens=half, memory=1.0, link=1.0),
                  calibrated=True)
    meas = {"device": dev, "dtype": dtype, "model": cfg.name, "quick": quick, "seconds": 0.0,
            "links_gbps": {d: {k: {str(s): v for s, v in by.items()} for k, by in kinds.items()}
                           for d, kinds in links.items()},
            "nvme": nvme, "cpu_adam_params_per_s": adam, "matmul_tflops": [{"tokens": t, "tflops": a} for t, a in mm],
            "matmul_fit": {"tflops": gemm_fit[0], "half_tokens": gemm_fit[1]}, "layer": layer_pts,
            "layer_fit": {"tflops": layer_fit[0], "half_tokens": layer_fit[1]}, "fit_used": fit, "memory_gbps": mem,
            "schedule_bytes_scale": scale}
    meas["seconds"] = time.perf_counter() - started
    return hw, meas


def write_profile(path: str, hw: Hardware, meas: dict) -> None:
    write_atomic(path, json.dumps({**hw.to_dict(), "measurements": meas}, indent=1))
