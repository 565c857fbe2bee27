"""A ~1B model (TinyLlama-1.1B's shape) trained under a 24 GiB cap on one GPU: does the runtime fit the plan?

    .venv/bin/python benchmarks/gpu_1b.py                       # plan for this GPU under a 24 GiB cap, run it
    .venv/bin/python benchmarks/gpu_1b.py --seq 2048 --batch 8 --steps 12 --calibrate   # measure this GPU first

The plan is made for the GPU this runs on: its CUDA name mapped to the catalog GPU it is (runtime.device.
catalog_gpu), or, for a GPU the catalog lacks or with --calibrate, a quick calibration of this machine by the
runtime (runtime/calibrate.py); --gpu names a catalog GPU instead. The plan's budget is --cap-gib (the ILP decides
tiers, blocks, micro-batch); the runtime caps the process at that budget (runtime/device.py), and --steps steps
run on random tokens. Printed: the plan's summary,
the median step time against the plan's prediction, torch.cuda.max_memory_allocated against the plan's predicted
peak, the runtime's device ledger, and the overlap ratio from the measured trace. Needs CUDA.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from planner.hardware import GIB, make_hardware, with_overrides  # noqa: E402
from planner.models import CATALOG  # noqa: E402
from planner.planning import Request, make_plan  # noqa: E402
from runtime.calibrate import calibrate  # noqa: E402
from runtime.data import TokenData  # noqa: E402
from runtime.device import catalog_gpu  # noqa: E402
from runtime.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b")
    p.add_argument("--gpu", default=None, help="catalog GPU the plan assumes (default: the one this runs on)")
    p.add_argument("--calibrate", action="store_true", help="measure this machine first and plan with that")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps-per-block", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--nvme-dir", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_1b.py needs CUDA")
    cfg = CATALOG[args.model]
    name = torch.cuda.get_device_name(0)
    gpu = args.gpu or (None if args.calibrate else catalog_gpu(name))
    nvme_gib = 200 if args.nvme_dir else 0
    if gpu is None:
        print(f"{name}: calibrating this machine (quick) ...")
        measured, _ = calibrate(quick=True, model=args.model, directory=args.nvme_dir)
        hw = with_overrides(measured, vram_gib=args.cap_gib, host_ram_gib=64, nvme_gib=nvme_gib)
    else:
        hw = make_hardware(gpu=gpu, vram_gib=args.cap_gib, host_ram_gib=64, nvme_gib=nvme_gib)
    print(f"running on {name}; planning for {hw.gpu.name}{' (calibrated)' if hw.calibrated else ''}")
    plan = make_plan(cfg, hw, Request(vram_gib=args.cap_gib, seq_len=args.seq, batch=args.batch,
                                      steps_per_block=args.steps_per_block, time_limit_s=10))
    tiers = {}
    for pl in plan.placements:
        tiers[(pl.weights, pl.master, pl.activations)] = tiers.get((pl.weights, pl.master, pl.activations), 0) + 1
    print(f"{cfg.name}: {len(plan.blocks)} blocks, micro-batch {plan.shape.micro_batch} x {plan.shape.grad_accum}, "
          f"seq {plan.shape.seq_len}; placements (weights, state, activations): {tiers}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.bin")
        need = (args.steps + 2) * args.batch * (args.seq + 1) * 2
        np.random.default_rng(0).integers(0, cfg.vocab, need).astype(np.uint16).tofile(path)
        data = TokenData.open(path, seq_len=args.seq, seed=0)
        tc = TrainConfig(steps=args.steps, quiet=True, nvme_dir=args.nvme_dir or tmp,
                         summary_path=os.path.join(tmp, "summary.json"))
        torch.cuda.reset_peak_memory_stats()
        tr = Trainer(plan, data, tc)
        try:
            recs = [tr.step() for _ in range(args.steps)]
            summary = tr.summary()
        finally:
            tr.close()
    times = [r["step_seconds"] for r in recs[1:]] or [recs[0]["step_seconds"]]
    predicted_s = statistics.mean(ph.step_seconds for ph in plan.predicted.phases)
    peak = torch.cuda.max_memory_allocated()
    print(f"step time: median {statistics.median(times):.3f} s (plan predicts {predicted_s:.3f} s per step)")
    print(f"loss: {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}")
    print(f"max_memory_allocated {peak / GIB:.2f} GiB; plan's predicted peak "
          f"{plan.predicted.peak_vram_bytes / GIB:.2f} GiB (budget {plan.budget_bytes / GIB:.1f} GiB, "
          f"reserve {plan.reserve_bytes / GIB:.1f} GiB); "
          f"runtime ledger {summary['device_peak_bytes'] / GIB:.2f} GiB")
    print(f"overlap ratio (busy over wall): {summary['overlap_ratio']:.2f}; bytes per link: "
          + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in summary["bytes_by_link"].items()))


if __name__ == "__main__":
    main()
