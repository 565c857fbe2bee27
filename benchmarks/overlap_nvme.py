"""Does streaming weights from NVMe overlap with compute? On the CPU, the CPU standing in for the GPU.

    .venv/bin/python benchmarks/overlap_nvme.py                  # defaults: ~540 MB of fp32 decoder weights
    .venv/bin/python benchmarks/overlap_nvme.py --nvme-dir /mnt/nvme/tmp --tokens 64

A Llama-shaped model whose decoder layers all live on the NVMe tier, in the phase of its top block (the head,
resident): every step reads each decoder layer's file (O_DIRECT: each read reaches the drive, never the page
cache), copies it to the "device", runs the layer's forward and evicts it; then the head's forward, backward and
AdamW step. That is BCD's "pre-inference" through the frozen layers below the active block, the part of a step
that streaming must hide.

With a GPU the compute takes no CPU core; here it does, so by default it gets all cores but one and the copy
engine's threads (NVMe reads with O_DIRECT, the staging-to-device copies) the last one.

Three figures, each the median step time over --rounds x --steps steps after one warm-up step (the three runs
take turns, --steps consecutive steps at a time):
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
from runtime.trainer import TrainConfig, Trainer  # noqa: E402

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
    place = [Placement(layer=i, weights=tiers if 1 <= i <= n else "gpu", master="cpu", moments="cpu", grads="cpu",
                       activations="gpu") for i in range(n + 2)]
    prof = profile_model(cfg)
    window_bytes = args.window * max(lp.param_bytes for lp in prof.layers[1:n + 1])
    plan = dataclasses.replace(base, placements=tuple(place), order="descending", method="bcd",
                               blocks=(Block(first=0, last=n), Block(first=n + 1, last=n + 1)),
                               prefetch_window_bytes=window_bytes)
    return dataclasses.replace(plan, predicted=predict(plan, prof))


def trainer(args, plan, data_path, nvme_dir, io_only=False) -> Trainer:
    data = TokenData.open(data_path, seq_len=plan.shape.seq_len, seed=0)
    tr = Trainer(plan, data, TrainConfig(steps=10**6, quiet=True, nvme_dir=nvme_dir, force_cpu=True))
    tr.tracer.enabled = True   # for the summary's overlap ratio
    tr.step()   # warm-up: the phase starts, buffers are made
    if io_only:
        ops = tr.ops
        tr.ops = IoOnly(plan=plan, phase=ops.phase, layers=ops.layers, layouts=ops.layouts, store=ops.store,
                        optim=ops.optim, act_buffers=ops.act_buffers, streams=ops.streams)
        tr.ops.staged = ops.staged   # the next step's first reads, issued early, land here
    return tr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8, help="decoder layers, all on NVMe")
    p.add_argument("--tokens", type=int, default=96, help="sequence length of the single micro-batch")
    p.add_argument("--steps", type=int, default=4, help="consecutive steps of a run per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--verbose", action="store_true", help="print every step's time")
    p.add_argument("--window", type=int, default=3, help="prefetch window, in layers (the plan's, set here)")
    p.add_argument("--nvme-dir", default=None, help="directory on the drive to test (default: a temp dir)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch compute threads (default: all cores but one, which the copy engine's threads use)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    nvme_dir = args.nvme_dir or tempfile.mkdtemp(prefix="blockfit-bench-")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "tokens.bin")
        np.random.default_rng(0).integers(0, 256, 200_000).astype(np.uint16).tofile(data_path)
        streamed = make(args, "nvme")
        runs = {"compute": trainer(args, make(args, "gpu"), data_path, nvme_dir),
                "io": trainer(args, streamed, data_path, nvme_dir, io_only=True),
                "both": trainer(args, streamed, data_path, nvme_dir)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        try:
            # rounds of consecutive steps per run (a run's steady state: its next step's first reads overlap
            # its own current step), the runs taking turns so a busy moment of the machine hits all three alike
            for _ in range(args.rounds):
                for name, tr in runs.items():
                    times[name] += [tr.step()["step_seconds"] for _ in range(args.steps)]
        finally:
            for tr in runs.values():
                tr.close()
        compute_s, io_s, both_s = (statistics.median(times[k]) for k in ("compute", "io", "both"))
        tr = runs["both"]
    read_bytes = sum(tr.layouts[i].numel * 4 for i in range(1, args.layers + 1))
    print(f"model: hidden {args.hidden}, ffn {args.ffn}, {args.layers} decoder layers, {args.tokens} tokens/step; "
          f"{read_bytes / 1e6:.0f} MB of fp32 weights read from NVMe per step; torch threads "
          f"{torch.get_num_threads()}")
    if args.verbose:
        for k, v in times.items():
            print(f"  {k:8s} steps (ms): " + " ".join(f"{t * 1e3:.0f}" for t in v))
    print(f"compute-only step  {compute_s * 1e3:8.1f} ms")
    print(f"I/O-only step      {io_s * 1e3:8.1f} ms  ({read_bytes / io_s / 1e9:.2f} GB/s read + copied)")
    print(f"overlapped step    {both_s * 1e3:8.1f} ms")
    ratio = both_s / max(compute_s, io_s)
    print(f"ratio overlapped / max(compute, I/O) = {ratio:.3f}  ({'OK' if ratio <= 1.2 else 'ABOVE'} 1.2)")
    s = tr.summary()
    print(f"overlap ratio (busy over wall, from the trace): {s['overlap_ratio']:.2f}")


if __name__ == "__main__":
    main()
