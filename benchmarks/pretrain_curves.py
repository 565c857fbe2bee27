"""Pretraining under BCD: three loss curves on the same data at equal tokens, and a plot.

    .venv/bin/python benchmarks/pretrain_curves.py --plot docs/pretrain_curves.png     # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/pretrain_curves.py --steps 400 --plot /tmp/c.png --json /tmp/c.json

From one random initialisation (seed 0) of the catalog's `tiny` Llama (hidden 64, 4 decoder layers, vocabulary
256), three runs read the same windows of a learnable stream, one random cycle through all 256 tokens repeated
(the next token is a function of the current one), for the same number of steps (sequence 32, 4 sequences per
step):
  full          --method full: every layer trained every step;
  BCD frozen    two blocks of decoder layers, embedding and head frozen (the fine-tuning default);
  BCD trained   the same with `plan --train-embeddings`: the embedding joins the bottom block, the head the top.
The BCD plans come from the planner (two blocks fixed with --blocks 2, 10 steps per block); every tensor stays
on the device (the CPU here). A frozen random head bounds the loss from below (tests/runtime/test_pretrain.py
derives the floor); training it under BCD is what lets pretraining work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from planner.hardware import make_hardware  # noqa: E402
from planner.models import CATALOG  # noqa: E402
from planner.plan import write_atomic  # noqa: E402
from planner.planning import Request, make_plan  # noqa: E402
from runtime.data import TokenData  # noqa: E402
from runtime.optim import AdamWConfig  # noqa: E402
from runtime.trainer import TrainConfig, Trainer  # noqa: E402

RUNS = ("full", "BCD frozen", "BCD trained")


def plans(steps_per_block: int) -> dict:
    cfg = CATALOG["tiny"]
    hw = make_hardware(gpu="rtx4090", vram_gib=1, host_ram_gib=8)
    base = dict(vram_gib=1, reserve_gib=0.25, seq_len=32, batch=4, micro_batch=2, steps_per_block=steps_per_block,
                time_limit_s=5)
    return {"full": make_plan(cfg, hw, Request(method="full", **base)),
            "BCD frozen": make_plan(cfg, hw, Request(min_blocks=2, max_blocks=2, **base)),
            "BCD trained": make_plan(cfg, hw, Request(min_blocks=2, max_blocks=2, train_embeddings=True, **base))}


def cycle_tokens(path: str, vocab: int, repeats: int = 200) -> str:
    np.tile(np.random.default_rng(0).permutation(vocab), repeats).astype(np.uint16).tofile(path)
    return path


def run(plan, data: str, steps: int, lr: float) -> list[float]:
    tc = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup=5, quiet=True, force_cpu=True,
                     track_temporaries=False, adamw=AdamWConfig(weight_decay=0.0, clip=1.0))
    tr = Trainer(plan, TokenData.open(data, seq_len=plan.shape.seq_len, seed=0), tc)
    try:
        return [tr.step()["loss"] for _ in range(steps)]
    finally:
        tr.close()


def plot(curves: dict, path: str, tokens_per_step: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, losses in curves.items():
        ax.plot([tokens_per_step * (k + 1) for k in range(len(losses))], losses, label=name, linewidth=1.2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("tiny Llama, token cycle: pretraining from random weights")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--steps-per-block", type=int, default=10)
    ap.add_argument("--plot", required=True, help="write the plot here (PNG)")
    ap.add_argument("--json", default=None, help="write the curves here")
    a = ap.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.plot))):
        ap.error(f"--plot {a.plot}: its directory does not exist")
    torch.set_num_threads(1)  # a tiny model: thread hand-offs cost more than the math
    ps = plans(a.steps_per_block)
    for name, p in ps.items():
        print(f"{name:12s} blocks {[(b.first, b.last) for b in p.blocks]}")
    with tempfile.TemporaryDirectory() as d:
        data = cycle_tokens(os.path.join(d, "cycle.bin"), CATALOG["tiny"].vocab)
        curves = {name: run(ps[name], data, a.steps, a.lr) for name in RUNS}
    tps = ps["full"].shape.tokens_per_step
    every = max(1, a.steps // 10)
    print(f"\nloss every {every} steps ({tps} tokens per step, same windows for all)")
    print("step   " + "  ".join(f"{n:>11s}" for n in RUNS))
    for k in list(range(every - 1, a.steps, every)):
        print(f"{k + 1:5d}  " + "  ".join(f"{curves[n][k]:11.3f}" for n in RUNS))
    print("\nfinal (mean of the last 10 steps): " + ", ".join(
        f"{n} {sum(curves[n][-10:]) / len(curves[n][-10:]):.3f}" for n in RUNS))
    plot(curves, a.plot, tps)
    print(f"plot: {a.plot}")
    if a.json:
        write_atomic(a.json, json.dumps({"tokens_per_step": tps, "curves": curves}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
