"""Calibration: measure this machine, through the runtime's own code, into the Hardware profile that `plan
--hardware` and the simulator read. The figures describe the program that will run the plan, so each link and the
CPU optimizer are timed through the runtime's primitives, not through stand-ins for them:
  - host-to-device and device-to-host GB/s by transfer size: the copy engine's path (a device buffer from
    DeviceBuffers, a non_blocking copy on a side stream) to and from the runtime's registered host memory
    (HostMemory: exact-size, 4 KiB-aligned, cudaHostRegister'ed). The largest size's rate becomes h2d_gbps /
    d2h_gbps; a plain pin_memory copy and a pageable one are measured beside it (pageable over registered is the
    pageable_factor). Without CUDA the CPU stands in as the device and these are memcpys between host buffers;
  - NVMe read and write GB/s with the runtime's NvmeFiles in --dir: layer-sized files written as the runtime
    writes them (pwrite, fdatasync, dropped from the page cache) and read into a staging buffer the way
    read_weights reads (O_DIRECT, several requests in flight; posix_fadvise(DONTNEED) where O_DIRECT is refused);
  - AdamW params/s: the runtime's BlockOptimizer.step_layer (its vectorised adamw_) on a host-tier state, with
    the copy of the new weights into registered host memory that the cpu_opt op makes (cpu_adam_params_per_s),
    and on a device-tier state, with the copy into the resident weights (gpu.adam_params_per_s: the step's
    passes timed, where an uncalibrated profile prices them as traffic at memory_gbps);
  - matmul TFLOPS at the model's GEMM shapes (tokens x hidden @ hidden x ffn) for several token counts, fitted
    to the cost model's curve achieved(T) = A * T / (T + half);
  - a real decoder layer (planner.llama, the runtime's layer) forward and backward at several token counts: its
    seconds less the memory-bound share the cost model prices separately, over the FLOPs the profile counts,
    fitted to the same curve. This fit (fit="layer", the default) sets bf16_tflops = A with matmul_max 1.0 and
    matmul_half_tokens = half, so attention, norms and framework overhead are in the rate the simulator prices a
    layer with; the bare GEMM fit (fit="gemm") is the alternative, and both are recorded;
  - memory-bound GB/s of an elementwise add (memory_gbps, with efficiency 1.0);
  - on the CPU, the threads compute runs on (gpu.shared_cores): the runtime's copy, collective and optimizer
    threads share those cores, and the simulator takes their busy time from compute's;
  - under torchrun (2+ processes), the bus bandwidth of an all-reduce between them through torch.distributed (NCCL
    on CUDA, gloo on CPU): `measure_collective`, run by every rank before rank 0 measures the rest alone. On one
    node it becomes host.collective_gbps, which the planner uses for the link between the node's GPUs; on a CPU
    also the wire bytes per CPU second a rank spends in it (gpu.collective_cpu_gbps: the share of a collective
    the simulator takes from compute, the rest of it being waits).
When the CPU stands in for the device the runtime keeps weights, activations and gradients in fp32 (Target),
twice the bf16 bytes the schedule counts for them, so the link, NVMe, memory and collective rates are scaled by
2 / itemsize to price schedule bytes (`schedule_bytes_scale`, recorded in the measurements; gradients reduced
over gloo are fp32 too; optimizer state is fp32 in both, so a stand-in's state transfers are priced at twice
their time). On CUDA nothing is scaled. The profile is
Hardware.to_dict() with calibrated=True plus a "measurements" section with every raw figure (Hardware.from_dict
ignores it). Every timed rate is the median of its repeats (`_time`). `quick=True` uses small sizes: a few seconds,
for tests. Only runtime/ touches CUDA: this module is the runtime's.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import tempfile
import time

from planner.errors import UserError
from planner.hardware import GB, GIB, GPU, Efficiency, Hardware, Host
from planner.models import load_model_config
from planner.plan import write_atomic
from runtime.hostio import BLOCK, HostMemory, NvmeFiles, aligned_empty
from runtime.optim import AdamWConfig, BlockOptimizer
from runtime.store import DeviceBuffers, FlatLayout, Target, TieredStore


def schedule_bytes_scale(target: Target) -> float:
    """Schedule bytes per byte the runtime moves: the schedule counts weights, activations and gradients in bf16,
    and a CPU standing in for the device holds them in fp32 (Target.weight_dtype), so a rate measured on the
    runtime's bytes times this is a rate in schedule bytes. 1 on CUDA."""
    return 1.0 if target.cuda else 2 / target.weight_dtype.itemsize


def _now(cuda: bool) -> float:
    if cuda:
        import torch
        torch.cuda.synchronize()
    return time.perf_counter()


def _time(fn, cuda: bool, repeats: int, budget_s: float = 2.0) -> float:
    """Median seconds of fn() over up to `repeats` calls after one warm-up call, fewer when they would take more
    than `budget_s`: the time a training step will see. (The best of the repeats was used first: on a quiet GPU
    the two agree within a few percent, but on a shared CPU the best call is 10-20% faster than the typical one,
    and every op of a step is a typical call: the simulator came out 20-30% fast against 2 CPU ranks.)"""
    t0 = _now(cuda)
    fn()
    warm = _now(cuda) - t0
    times = []
    for _ in range(max(1, min(repeats, int(budget_s / max(warm, 1e-9))))):
        t0 = _now(cuda)
        fn()
        times.append(_now(cuda) - t0)
    return statistics.median(times)


def measure_links(target: Target, sizes: list[int], repeats: int) -> dict:
    """GB/s per direction, host memory kind and transfer size, through the copy engine's own path: a device buffer
    from DeviceBuffers, a non_blocking copy_ on a side stream (the engine's h2d and d2h streams), to and from
    `registered` host memory (HostMemory: exact-size, 4 KiB aligned, cudaHostRegister'ed), which is what the
    runtime's pinned weights, staging buffers and activation buffers are. Beside it, for reference, `pinned`
    (PyTorch's pin_memory, the plain pinned copy) and `pageable` (ordinary memory, the pageable_factor)."""
    import torch
    host, bufs = HostMemory(pin=target.cuda), DeviceBuffers(target)
    stream = torch.cuda.Stream(target.device) if target.cuda else None
    dt = target.weight_dtype
    kinds = ("registered", "pinned", "pageable")
    out = {d: {k: {} for k in kinds} for d in ("h2d", "d2h")}

    def copy(dst, src, nb: bool) -> None:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            dst.copy_(src, non_blocking=nb)
    try:
        for n in sizes:
            numel = n // dt.itemsize
            dev_buf = bufs.take(numel)
            dev_buf.fill_(1)
            hosts = {"registered": host.empty(numel, dt),
                     "pinned": torch.empty(numel, dtype=dt, pin_memory=target.cuda),
                     "pageable": torch.empty(numel, dtype=dt)}
            for kind, h in hosts.items():
                h.fill_(2)
                nb = target.cuda and kind != "pageable"
                t = _time(lambda d=dev_buf, h=h, nb=nb: copy(d, h, nb), target.cuda, repeats)
                out["h2d"][kind][n] = numel * dt.itemsize / t / GB
                t = _time(lambda d=dev_buf, h=h, nb=nb: copy(h, d, nb), target.cuda, repeats)
                out["d2h"][kind][n] = numel * dt.itemsize / t / GB
            host.release(hosts["registered"])
            bufs.give(dev_buf)
    finally:
        host.close()
    return out


def measure_nvme(directory: str, nbytes: int, layer_bytes: int, target: Target, repeats: int = 2) -> dict:
    """GB/s of the runtime's NVMe reader and writer (runtime.hostio.NvmeFiles) in `directory`: files of one
    layer's weights (`layer_bytes`, at most half of `nbytes`), written as the runtime writes them (pwrite,
    fdatasync, dropped from the page cache), then read into a staging buffer from the runtime's HostMemory as
    read_weights does: O_DIRECT with several requests in flight, or, where the file system refuses O_DIRECT,
    after posix_fadvise(DONTNEED). Every write is made durable and every read reaches the drive, so each figure is
    the best of `repeats` passes over all the files (a pass of hundreds of MB is itself an average over many
    requests; the other rates are medians of short calls)."""
    import torch
    if not os.path.isdir(directory):
        raise UserError(f"--dir '{directory}' is not a directory.")
    if not os.access(directory, os.W_OK):
        raise UserError(f"--dir '{directory}' is not writable.")
    dt = target.weight_dtype
    numel = max(BLOCK, min(layer_bytes, nbytes // 2)) // dt.itemsize
    count = max(2, nbytes // (numel * dt.itemsize))
    files, host = NvmeFiles(directory), HostMemory(pin=target.cuda)
    try:
        src, staging = host.empty(numel, dt), host.empty(numel, dt)
        src.view(torch.uint8).random_(0, 256, generator=torch.Generator().manual_seed(0))
        write_s = read_s = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for j in range(count):
                files.write(f"calibrate-{j}", src)
            write_s = min(write_s, time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for j in range(count):
                files.read(f"calibrate-{j}", staging)
            read_s = min(read_s, time.perf_counter() - t0)
        if not torch.equal(staging.view(torch.uint8), src.view(torch.uint8)):
            raise UserError(f"NVMe calibration in '{directory}' read back other bytes than it wrote.")
    except OSError as e:
        raise UserError(f"cannot measure NVMe in '{directory}': {e.strerror or e}.") from None
    finally:
        files.close()
        host.close()
    total = count * numel * dt.itemsize
    method = (f"O_DIRECT, {files.requests} requests in flight" if files.direct
              else "posix_fadvise(DONTNEED) before each read (O_DIRECT refused)")
    return {"write_gbps": total / write_s / GB, "read_gbps": total / read_s / GB, "bytes": total,
            "file_bytes": numel * dt.itemsize, "files": count, "method": method, "dir": os.path.abspath(directory)}


def measure_adam(params: int, repeats: int, target: Target, tier: str = "cpu") -> dict:
    """AdamW parameters per second of the runtime's own step on `tier`: BlockOptimizer.step_layer (runtime.optim
    .adamw_, torch._foreach_* over views of one flat fp32 buffer), then the new weights copied where the engine puts
    them (runtime.engine `_apply_new`): into the layer's registered host buffer for the host tier (the cpu_opt op
    of host-resident weights), into its resident device weights for the device tier."""
    import torch
    mod = torch.nn.Module()
    with torch.device("meta"):   # a layer's worth of tensors of a few sizes, as a block's parameters are
        for name, n in (("a", params // 2), ("b", params // 4), ("c", params // 4)):
            mod.register_parameter(name, torch.nn.Parameter(torch.empty(n)))
    layout = FlatLayout.of(mod, target.align_numel)
    store = TieredStore(target=target, layouts=[layout], tiers=[tier], nvme_dir=None, window_layers=0)
    try:
        store.put(0, torch.randn(layout.numel))
        opt = BlockOptimizer(cfg=AdamWConfig(), store=store, layouts=[layout], master_tiers=[tier],
                             grad_tiers=[tier], switch_state="reset")
        opt.states[0] = opt.fresh(0)
        if tier == "cpu":
            grads = layout.views(aligned_empty(layout.numel, torch.float32).normal_())
            weights = store.pinned(0)
        else:   # the device's gradients are in the weight dtype
            grads = layout.views(torch.randn(layout.numel, device=target.device).to(target.weight_dtype))
            weights = store.resident(0)

        def step() -> None:
            new, _ = opt.step_layer(0, grads, 1e-4)
            weights.copy_(new)
        t = _time(step, target.cuda and tier != "cpu", repeats)
    finally:
        store.close()
    into = "registered host memory" if tier == "cpu" else "the resident weights"
    return {"params_per_s": layout.params / t, "params": layout.params,
            "what": f"runtime.optim BlockOptimizer.step_layer ({'host' if tier == 'cpu' else 'device'} tier) + copy "
                    f"into {into}"}


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
        s = _time(lambda x=x: torch.matmul(x, w), dev == "cuda", 3 if quick else 5)
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
        sec = _time(lambda x=x, g=g: layer(x).backward(g), dev == "cuda", repeats)
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
    t = _time(lambda: torch.add(x, y, out=z), dev == "cuda", repeats)
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


def time_all_reduce(x, reps: int, cuda: bool) -> tuple[float, float]:
    """(median seconds, median CPU seconds of this process) of `reps` all-reduces of `x` after one warm-up, each
    after a barrier. The CPU seconds (user + system, every thread of the process: gloo's included) are what a
    collective takes from the cores compute runs on when the device is a CPU (GPU.collective_cpu_gbps)."""
    import resource

    import torch.distributed as dist

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    dist.all_reduce(x)
    wall, used = [], []
    for _ in range(reps):
        dist.barrier()
        t0, c0 = _now(cuda), cpu()
        dist.all_reduce(x)
        wall.append(_now(cuda) - t0)
        used.append(cpu() - c0)
    return statistics.median(wall), statistics.median(used)


def measure_collective(world, device: str, sizes: list[int], reps: int) -> dict | None:
    """Bus bandwidth (nccl-tests' convention: algorithm bandwidth x 2(N-1)/N, comparable to a link's figure and to
    planner.cluster's ring model) of an all-reduce of each size in `sizes` bytes between the world's processes,
    through torch.distributed: NCCL on CUDA, gloo on CPU. None with one process (nothing to measure). On the CPU,
    also the wire bytes (planner.cluster.wire_bytes) per second of the CPU time a rank spends in it (`cpu_gbps`).

    Every rank makes the same calls (a fixed number: a time budget could differ between ranks and leave one
    waiting in a collective forever); each size's time is the median of `reps` after a barrier, the slowest rank's
    (a max-reduce), since a collective ends when its last rank does; its CPU time is the busiest rank's. The
    process group is the one torchrun's environment describes (MASTER_ADDR, MASTER_PORT); one made here is
    destroyed before returning."""
    if world.size < 2:
        return None
    import torch
    import torch.distributed as dist

    from planner.cluster import wire_bytes
    made = not dist.is_initialized()
    cuda = device == "cuda"
    if made:
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=world.rank, world_size=world.size)
    try:
        dev = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
        n, out, cpu_rate = world.size, {}, {}
        for size in sizes:
            x = torch.zeros(size // 4, dtype=torch.float32, device=dev)   # zeros: sums stay finite
            wall, used = time_all_reduce(x, reps, cuda)
            worst = torch.tensor([wall, used], dtype=torch.float64, device=dev)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            wall, used = (float(v) for v in worst.tolist())
            wire = wire_bytes("all_reduce", size, n)   # 2(N-1)/N x size: bus bandwidth = wire bytes / s
            out[str(size)] = wire / wall / GB
            if not cuda and used > 0:
                cpu_rate[str(size)] = wire / used / GB
        return {"backend": dist.get_backend(), "world": n, "local_world": world.local_size, "bus_gbps": out,
                "cpu_gbps": cpu_rate,
                "what": "torch.distributed.all_reduce of float32 buffers, median of "
                        f"{reps} per size, slowest rank; bus bandwidth = bytes / s x 2(N-1)/N; cpu_gbps = wire "
                        "bytes per CPU second of the busiest rank (user + system, all its threads)"}
    finally:
        if made:
            dist.destroy_process_group()


def calibrate(*, directory: str | None = None, quick: bool = False, model: str = "7b", dtype: str | None = None,
              device: str | None = None, fit: str = "layer", seq: int = 512, nvme_file_bytes: int | None = None,
              log=None, collective: dict | None = None) -> tuple[Hardware, dict]:
    """Measure everything; (the Hardware profile, the raw measurements). The NVMe files are one decoder layer of
    `model` at the runtime's weight dtype (what read_weights moves), or `nvme_file_bytes` when given.
    `collective`: measure_collective's result when it ran (under torchrun); on one node its largest size's bus
    bandwidth becomes host.collective_gbps (across nodes the figure mixes both levels, so it is only recorded)."""
    import torch
    say = log or (lambda _msg: None)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here.")
    target = Target.detect(force_cpu=dev == "cpu")
    dtype = dtype or ("bfloat16" if dev == "cuda" else "float32")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype must be bfloat16, float16 or float32, got '{dtype}'.")
    if fit not in ("layer", "gemm"):
        raise UserError(f"--fit must be layer or gemm, got '{fit}'.")
    cfg = load_model_config(model)
    from planner.profile import profile_model
    file_bytes = nvme_file_bytes or profile_model(cfg).layers[1].params * target.weight_dtype.itemsize
    started = time.perf_counter()
    sizes = [1 << 20, 16 << 20] if quick else [1 << 20, 16 << 20, 64 << 20, 256 << 20]
    reps = 3 if quick else 5
    say(f"device: {dev}; the runtime's copy path by size ({', '.join(f'{s >> 20} MiB' for s in sizes)}) ...")
    links = measure_links(target, sizes, reps)
    say("NVMe, through the runtime's reader and writer ...")
    nvme = measure_nvme(directory or tempfile.gettempdir(), (32 << 20) if quick else (512 << 20),
                        file_bytes, target)
    say("CPU AdamW, the runtime's ...")
    adam = measure_adam((4 << 20) if quick else (16 << 20), reps, target)
    say("AdamW on the device, the runtime's ...")
    dev_adam = measure_adam((4 << 20) if quick else (16 << 20), reps, target, tier="gpu")
    say(f"matmul at {cfg.name}'s GEMM shape ({cfg.hidden} x {cfg.ffn}), {dtype} ...")
    mm = measure_matmul(dev, dtype, cfg.hidden, cfg.ffn, quick)
    gemm_fit = fit_matmul(mm)
    say("memory bandwidth ...")
    mem = measure_memory(dev, (64 << 20) if quick else (256 << 20), reps)
    big = sizes[-1]
    # the CPU stand-in holds weights, activations and gradients in fp32: rates per schedule (bf16) byte
    scale = schedule_bytes_scale(target)
    h2d, d2h = links["h2d"]["registered"][big] * scale, links["d2h"]["registered"][big] * scale
    mem *= scale
    say(f"a {cfg.name} decoder layer, forward and backward ...")
    layer_pts = measure_layer(cfg, dev, dtype, quick, reps, seq)
    layer_fit = fit_layer(layer_pts, mem)
    peak, half = layer_fit if fit == "layer" else gemm_fit
    pageable = links["h2d"]["pageable"][big] / links["h2d"]["registered"][big]
    ram = _ram_gib()
    if dev == "cuda":
        props = torch.cuda.get_device_properties(target.device)
        name, vram, host_ram = props.name, props.total_memory / GIB, ram
    else:  # one memory plays both tiers: half for the "device", half for the host
        name, vram, host_ram = f"{_cpu_name()} (CPU as the device)", ram / 2, ram / 2
    nvme_gib = 0.0
    if directory:
        st = os.statvfs(directory)
        nvme_gib = st.f_bavail * st.f_frsize / GIB
    coll = coll_cpu = 0.0
    if collective and collective["world"] == collective["local_world"]:
        coll = collective["bus_gbps"][max(collective["bus_gbps"], key=int)] * scale   # fp32 gradients on a CPU
        by_size = collective.get("cpu_gbps") or {}
        if dev == "cpu" and by_size:
            coll_cpu = by_size[max(by_size, key=int)] * scale
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    gpu = GPU(id=f"calibrated-{dev}", name=name, vram_gib=round(vram, 2), memory_gbps=mem, bf16_tflops=peak,
              h2d_gbps=h2d, d2h_gbps=d2h, pcie="", shared_cores=0 if dev == "cuda" else torch.get_num_threads(),
              adam_params_per_s=dev_adam["params_per_s"], collective_cpu_gbps=coll_cpu,
              sources={
                  "calibrated": f"blockfit calibrate on {socket.gethostname()} at {stamp}, device {dev}",
                  "bf16_tflops": f"fitted asymptote of {dtype} " + (f"{cfg.name} decoder layers" if fit == "layer"
                                                                    else f"matmul at {cfg.name}'s GEMM shape"),
                  "h2d_gbps": "the runtime's copies between host buffers (no CUDA)" if dev == "cpu" else
                              f"the runtime's copies of {big >> 20} MiB from registered host memory"})
    host = Host(ram_gib=round(host_ram, 2), nvme_gib=round(nvme_gib, 2), nvme_read_gbps=nvme["read_gbps"] * scale,
                nvme_write_gbps=nvme["write_gbps"] * scale, cpu_adam_params_per_s=adam["params_per_s"],
                pageable_factor=min(1.0, pageable), collective_gbps=coll)
    hw = Hardware(gpu=gpu, host=host, eff=Efficiency(matmul_max=1.0, matmul_half_tokens=half, memory=1.0, link=1.0),
                  calibrated=True)
    meas = {"device": dev, "dtype": dtype, "model": cfg.name, "quick": quick, "seconds": 0.0,
            "links_gbps": {d: {k: {str(s): v for s, v in by.items()} for k, by in kinds.items()}
                           for d, kinds in links.items()},
            "nvme": nvme, "cpu_adam": adam, "device_adam": dev_adam,
            "matmul_tflops": [{"tokens": t, "tflops": a} for t, a in mm],
            "matmul_fit": {"tflops": gemm_fit[0], "half_tokens": gemm_fit[1]}, "layer": layer_pts,
            "layer_fit": {"tflops": layer_fit[0], "half_tokens": layer_fit[1]}, "fit_used": fit, "memory_gbps": mem,
            "schedule_bytes_scale": scale, "collective": collective}
    meas["seconds"] = time.perf_counter() - started
    return hw, meas


def write_profile(path: str, hw: Hardware, meas: dict) -> None:
    write_atomic(path, json.dumps({**hw.to_dict(), "measurements": meas}, indent=1))
