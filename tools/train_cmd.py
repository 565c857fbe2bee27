"""`blockfit train`: run a plan for real.

    blockfit train --plan plan.json --data tokens.bin --steps 1000 --ckpt-dir ckpt --ckpt-every 100
    blockfit train --plan plan.json --data tokens.bin --steps 1000 --ckpt-dir ckpt --resume
    blockfit train --plan plan.json --data corpus.txt --steps 20 --nvme-dir /mnt/nvme/scratch \\
        --trace trace.json --summary summary.json --metrics metrics.jsonl

Everything is checked before anything is written (runtime/guards.py); bad input exits 2 with one paragraph.
"""
from __future__ import annotations

import argparse

from planner.errors import UserError, check_positive
from planner.plan import load_plan


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train under a plan (BCD or full) with tiered storage",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan JSON written by `plan --out`")
    p.add_argument("--data", required=True, help="tokens (.bin uint16, .u32.bin, .npy) or UTF-8 text")
    p.add_argument("--steps", type=int, help="optimizer steps of the run (default: one cycle through the blocks)")
    p.add_argument("--stop-after", type=int, help="stop this invocation after N steps (checkpointed); the LR "
                                                  "schedule still spans --steps")
    p.add_argument("--ckpt-dir", help="checkpoint directory")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (default: only at the end)")
    p.add_argument("--resume", nargs="?", const="", default=None,
                   help="continue from a checkpoint (a step directory, or the newest in --ckpt-dir)")
    p.add_argument("--nvme-dir", help="directory on the NVMe drive for the plan's NVMe tier")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine (default lr / 10)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm of the block; 0 turns it off")
    p.add_argument("--seed", type=int, default=0, help="weight init and data order")
    p.add_argument("--data-dtype", choices=("uint16", "uint32"), help="token dtype of a .bin file")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory, for text data")
    p.add_argument("--init-from", help="local safetensors checkpoint (Hugging Face names) to start from")
    p.add_argument("--trace", help="write the measured Chrome trace JSON here")
    p.add_argument("--summary", help="write a JSON summary (step time per phase, bytes per link, peak, overlap)")
    p.add_argument("--metrics", help="append one JSON line per step here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.set_defaults(func=run)


def _config(args, plan):
    from runtime.optim import AdamWConfig
    from runtime.trainer import TrainConfig
    steps = args.steps if args.steps is not None else plan.steps_per_block * len(plan.blocks)
    check_positive("--steps", steps, integer=True, upper=10**9)
    check_positive("--stop-after", args.stop_after, integer=True, upper=10**9)
    check_positive("--lr", args.lr, upper=10)
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    for flag, v in (("--min-lr", min_lr), ("--weight-decay", args.weight_decay), ("--clip", args.clip)):
        if not v >= 0:
            raise UserError(f"{flag} must be >= 0, got {v!r}.")
    for flag, v in (("--warmup", args.warmup), ("--ckpt-every", args.ckpt_every), ("--seed", args.seed)):
        if v < 0:
            raise UserError(f"{flag} must be >= 0, got {v!r}.")
    if min_lr > args.lr:
        raise UserError(f"--min-lr ({min_lr}) is above --lr ({args.lr}).")
    if args.ckpt_every and not args.ckpt_dir:
        raise UserError("--ckpt-every needs --ckpt-dir.")
    return TrainConfig(steps=steps, lr=args.lr, min_lr=min_lr, warmup=args.warmup, seed=args.seed,
                       adamw=AdamWConfig(weight_decay=args.weight_decay, clip=args.clip), ckpt_dir=args.ckpt_dir,
                       ckpt_every=args.ckpt_every, stop_after=args.stop_after, nvme_dir=args.nvme_dir,
                       init_from=args.init_from, metrics_path=args.metrics, trace_path=args.trace,
                       summary_path=args.summary, quiet=args.quiet, force_cpu=args.cpu)


def run(args) -> int:
    from runtime import guards
    from runtime.data import TokenData
    from runtime.store import Target
    from runtime.trainer import Trainer

    plan = load_plan(args.plan)
    cfg = _config(args, plan)
    guards.check_supported(plan)
    guards.check_model(plan, args.init_from)
    data = TokenData.open(args.data, seq_len=plan.shape.seq_len, seed=args.seed, tokenizer_dir=args.tokenizer,
                          dtype=args.data_dtype)
    guards.check_data(data, plan)
    resume = guards.check_resume(plan, args.resume, args.ckpt_dir)
    target = Target.detect(force_cpu=args.cpu)
    dtype = str(target.weight_dtype).replace("torch.", "")
    guards.check_nvme(plan, args.nvme_dir, guards.nvme_need_bytes(plan, dtype))
    guards.check_host_ram(guards.ram_need_bytes(plan, dtype, cuda=target.cuda))
    guards.check_outputs(args.metrics, args.trace, args.summary)

    trainer = Trainer(plan, data, cfg, resume=resume, target=target)
    try:
        code = trainer.run()
    finally:
        trainer.close()
    if not args.quiet and trainer.history:
        last = trainer.history[-1]
        print(f"step {last['step']}/{cfg.steps}  loss {last['loss']:.4f}  "
              f"device peak {last['device_peak_bytes'] / 2**20:.1f} MiB")
    return code
