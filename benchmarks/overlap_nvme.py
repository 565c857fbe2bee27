"""Does streaming weights from NVMe overlap with compute? On the CPU, the CPU standing in for the GPU.

    .venv/bin/python benchmarks/overlap_nvme.py                  # defaults: ~540 MB of fp32 decoder weights
    .venv/bin/python benchmarks/overlap_nvme.py --nvme-dir /mnt/nvme/tmp --tokens 64

A Llama-shaped model whose decoder layers live on the NVMe tier, trained in the phase of its top block (the last
decoder layer and the head, resident): every step reads each decoder layer's file (through the page cache's
back door: posix_fadvise DONTNEED before every read, so each read reaches the drive), copies it to the "device",
runs the layer's forward, and evicts it; the top block runs forward and backward and its AdamW step on the host.

Three figures, each the median step time over --steps steps after one warm-up step:
  compute-only   the same plan with every weight resident: no I/O at all;
  I/O-only       the same schedule with the compute ops (forward, backward, recompute, AdamW) skipped: reads,
                 copies and evictions only, in the same order and windows;
  overlapped     the real thing.
The copy engine overlaps well when overlapped <= 1.2 x max(compute-only, I/O-only).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from planner.hardware import make_hardware  # noqa: E402
from planner.models import ModelConfig  # noqa: E402
from planner.plan import Block, Placement  # noqa: E402
from planner.planning import Request, make_plan, predict  # noqa: E402
from planner.profile import profile_model  # noqa: E402
from runtime.data import TokenData  # noqa: E402
from runtime.engine import PhaseOps  # noqa: E402
from runtime.trainer import Trainer, TrainConfig  # noqa: E402

SKIPPED = {"forward", "backward", "recompute", "optimizer_step", "upload_weights", "write_weights", "grad_offload"}


class IoOnly(PhaseOps):
    """The schedule's transfers and evictions, its compute skipped."""

    def execute(self, op, gpu) -> None:
        if op.kind not in SKIPPED:
            super().execute(op, gpu)

    def book(self, op) -> None:
        if op.kind not in SKIPPED and op.kind not in ("offload_act", "fetch_act", "grad_offload"):
            super().book(op)

    def begin_step(self, tokens, labels, lr) -> None:
        super().begin_step(tokens, labels, lr)
        self.loss = torch.zeros(())


def make(args, tiers: str):
    cfg = ModelConfig(name="bench", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                      kv_heads=args.hidden // 64, ffn=args.ffn, vocab=256, max_seq=4096)
    hw = make_hardware(gpu="rtx4090", vram_gib=24, host_ram_gib=64, nvme_gib=100)
    base = make_plan(cfg, hw, Request(vram_gib=24, seq_len=args.tokens, batch=1, micro_batch=1,
                                      steps_per_block=1000, time_limit_s=2))
    n = cfg.layers
    place = [Placement(layer=i, weights=tiers if 1 <= i < n else "gpu", master="cpu", moments="cpu", grads="cpu",
                       activations="gpu") for i in range(n + 2)]
    plan = dataclasses.replace(base, placements=tuple(place), order="descending", method="bcd",
                               blocks=(Block(first=0, last=n - 1), Block(first=n, last=n + 1)))
    return dataclasses.replace(plan, predicted=predict(plan, profile_model(cfg)))


def step_times(args, plan, data_path, nvme_dir, io_only=False) -> tuple[float, Trainer]:
    data = TokenData.open(data_path, seq_len=plan.shape.seq_len, seed=0)
    tr = Trainer(plan, data, TrainConfig(steps=args.steps + 1, quiet=True, nvme_dir=nvme_dir, force_cpu=True))
    tr.tracer.enabled = True   # for the summary's overlap ratio
    try:
        tr.step()   # warm-up: the phase starts, buffers are made
        if io_only:
            ops = tr.ops
            tr.ops = IoOnly(plan=plan, phase=ops.phase, layers=ops.layers, layouts=ops.layouts, store=ops.store,
                            optim=ops.optim, act_buffers=ops.act_buffers, streams=ops.streams)
        times = [tr.step()["step_seconds"] for _ in range(args.steps)]
        return statistics.median(times), tr
    finally:
        tr.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--layers", type=int, default=9, help="decoder layers (all but the top one on NVMe)")
    p.add_argument("--tokens", type=int, default=48, help="sequence length of the single micro-batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--nvme-dir", default=None, help="directory on the drive to test (default: a temp dir)")
    args = p.parse_args()
    nvme_dir = args.nvme_dir or tempfile.mkdtemp(prefix="blockfit-bench-")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "tokens.bin")
        np.random.default_rng(0).integers(0, 256, 200_000).astype(np.uint16).tofile(data_path)
        streamed = make(args, "nvme")
        resident = make(args, "gpu")
        compute_s, _ = step_times(args, resident, data_path, nvme_dir)
        io_s, io_tr = step_times(args, streamed, data_path, nvme_dir, io_only=True)
        both_s, tr = step_times(args, streamed, data_path, nvme_dir)
    read_bytes = sum(tr.layouts[i].numel * 4 for i in range(1, args.layers))
    print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} decoder layers, {args.tokens} tokens/step; "
          f"{read_bytes / 1e6:.0f} MB of fp32 weights read from NVMe per step; torch threads "
          f"{torch.get_num_threads()}")
    print(f"compute-only step  {compute_s * 1e3:8.1f} ms")
    print(f"I/O-only step      {io_s * 1e3:8.1f} ms  ({read_bytes / io_s / 1e9:.2f} GB/s read + copied)")
    print(f"overlapped step    {both_s * 1e3:8.1f} ms")
    ratio = both_s / max(compute_s, io_s)
    print(f"ratio overlapped / max(compute, I/O) = {ratio:.3f}  ({'OK' if ratio <= 1.2 else 'ABOVE'} 1.2)")
    s = tr.summary()
    print(f"overlap ratio (busy over wall, from the trace): {s['overlap_ratio']:.2f}")


if __name__ == "__main__":
    main()
