"""`blockfit calibrate`: measure this machine through the runtime's own primitives (its registered host buffers and
copy path, its NVMe reader and writer, its CPU AdamW; runtime/calibrate.py) and write a hardware profile for `plan`
and `simulate`.

    blockfit calibrate --out hw.json                        # ~30 s: links, NVMe, CPU AdamW, matmul, memory
    blockfit calibrate --out hw.json --dir /mnt/nvme/tmp    # NVMe measured there (and its free space offered)
    blockfit calibrate --out hw.json --quick                # a few seconds, rougher
    torchrun --nproc-per-node 8 .venv/bin/blockfit calibrate --out hw.json   # also the all-reduce bandwidth
                                                            # between the 8 GPUs (rank 0 writes the profile)
    plan --model 7b --hardware hw.json                      # then plan with it
    blockfit simulate --plan p.json --hardware hw.json      # or predict a plan on it
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="measure this machine into a hardware profile",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="write the hardware profile JSON here")
    p.add_argument("--dir", help="directory on the drive to measure as NVMe (default: the temp directory, "
                                 "and no NVMe capacity offered to plans)")
    p.add_argument("--quick", action="store_true", help="small sizes: a few seconds, rougher figures")
    p.add_argument("--model", default="7b", help="model whose GEMM shapes to time (default 7b)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="matmul dtype (default: what the runtime computes in: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when present")
    p.add_argument("--seq", type=int, default=512, help="sequence length of the layer timings (default 512)")
    p.add_argument("--fit", choices=("layer", "gemm"), default="layer",
                   help="price compute by a real decoder layer's rate (default) or by the bare GEMM's")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(a) -> int:
    import os

    from planner.errors import UserError, check_positive
    from planner.models import load_model_config
    from runtime.calibrate import calibrate, write_profile
    from tools.simulate_cmd import check_writable
    check_writable(a.out)
    check_positive("--seq", a.seq, integer=True, upper=1 << 20)
    if a.dir is not None and not os.path.isdir(a.dir):   # before seconds of measuring
        raise UserError(f"--dir '{a.dir}' is not a directory; give a directory on the drive to measure.")
    load_model_config(a.model)
    log = None if a.quiet else (lambda msg: print(msg, flush=True))
    from runtime.calibrate import measure_collective
    from runtime.dist import from_env
    world = from_env()
    collective = None
    if world.distributed:   # under torchrun: every rank joins the collective, then rank 0 measures the rest alone
        import torch
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if log:
            log(f"rank {world.rank}: all-reduce between {world.size} processes ...")
        collective = measure_collective(world, device, [1 << 20, 16 << 20] if a.quick else
                                        [1 << 20, 16 << 20, 64 << 20, 256 << 20], 3 if a.quick else 5)
        if not world.leader:
            return 0
    elif log:
        log("one process: no collective to measure (run under torchrun --nproc-per-node N to measure one)")
    hw, meas = calibrate(directory=a.dir, quick=a.quick, model=a.model, dtype=a.dtype, device=a.device,
                         fit=a.fit, seq=a.seq, log=log, collective=collective)
    write_profile(a.out, hw, meas)
    if not a.quiet:
        g, h = hw.gpu, hw.host
        print(f"{g.name}: matmul {g.bf16_tflops:.3g} TFLOPS (half at {hw.eff.matmul_half_tokens:.0f} tokens), "
              f"memory {g.memory_gbps:.3g} GB/s, h2d {g.h2d_gbps:.3g} / d2h {g.d2h_gbps:.3g} GB/s, "
              f"NVMe read {h.nvme_read_gbps:.3g} / write {h.nvme_write_gbps:.3g} GB/s "
              f"({meas['nvme']['method']}), CPU AdamW {h.cpu_adam_params_per_s / 1e9:.3g} G params/s"
              + (f", all-reduce bus {h.collective_gbps:.3g} GB/s" if h.collective_gbps else "")
              + (f" ({g.collective_cpu_gbps:.3g} GB on the wire per CPU second)" if g.collective_cpu_gbps else "")
              + f"; {meas['seconds']:.1f} s")
        print(f"hardware profile written to {a.out}")
    return 0
