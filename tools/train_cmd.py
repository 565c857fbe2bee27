"""`blockfit train`: run a plan for real.

    blockfit train --plan plan.json --data tokens.bin --steps 1000 --ckpt-dir ckpt --ckpt-every 100
    blockfit train --plan plan.json --data tokens.bin --steps 1000 --ckpt-dir ckpt --resume
    blockfit train --plan plan.json --data corpus.txt --steps 20 --nvme-dir /mnt/nvme/scratch \\
        --trace trace.json --summary summary.json --metrics metrics.jsonl
    blockfit train --nproc-per-node 2 --plan plan2.json --data tokens.bin     # a plan for 2 GPUs, on 2 ranks
    torchrun --nproc-per-node 2 .venv/bin/blockfit train --plan plan2.json --data tokens.bin   # the same

A plan for N GPUs (`plan --gpus N`) runs on exactly N ranks, started by torchrun (--nnodes M --rdzv-endpoint ...
across nodes) or by --nproc-per-node on one node; any other world size is refused. Rank 0 writes --metrics,
--trace and --summary as named, rank r > 0 beside them with .rank<r> before the extension.

Everything is checked before anything is written (runtime/guards.py); bad input exits 2 with one paragraph.
Exit codes: 0 done; 2 bad input, or a fault (disk full, a scratch file gone, a damaged checkpoint), each with one
paragraph and the last checkpoint intact; 3 a non-finite loss or gradient norm stopped training (nothing bad was
saved; --skip-nonfinite N skips up to N such steps in a row instead); 4 another rank died or stopped answering
(data parallel); 130/143 SIGINT/SIGTERM (checkpointed).
"""
from __future__ import annotations

import argparse
import os
import sys

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
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW first-moment decay (default 0.9)")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW second-moment decay (default 0.95)")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW denominator epsilon (default 1e-8)")
    p.add_argument("--data-order", choices=("shuffled", "sequential"), default="shuffled",
                   help="windows of seq+1 tokens in a seeded shuffle per epoch (default), or in file order")
    p.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip a step whose loss or gradient norm is NaN/inf (no update) up to N times in a row; "
                        "default 0: stop with exit code 3")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even though --lr, --warmup, --weight-decay, betas, eps, --clip, --data-order or "
                        "the data differ from the checkpoint's")
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
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="launch N ranks on this node through torchrun (the plan must be for N GPUs)")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a collective waits for the other ranks before this rank gives up (default 300; "
                        "a rank that dies is noticed at once)")
    p.set_defaults(func=run)


def _config(args, plan):
    from runtime.guards import check_finite_flag
    from runtime.optim import AdamWConfig, check_adamw
    from runtime.trainer import TrainConfig
    steps = args.steps if args.steps is not None else plan.steps_per_block * len(plan.blocks)
    check_positive("--steps", steps, integer=True, upper=10**9)
    check_positive("--stop-after", args.stop_after, integer=True, upper=10**9)
    check_positive("--lr", args.lr, upper=10)
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    check_finite_flag("--min-lr", min_lr, lo=0, hi=10)
    check_finite_flag("--warmup", args.warmup, lo=0, hi=10**9, integer=True)
    check_finite_flag("--ckpt-every", args.ckpt_every, lo=0, hi=10**9, integer=True)
    check_finite_flag("--seed", args.seed, lo=0, hi=2**63 - 1, integer=True)
    check_finite_flag("--skip-nonfinite", args.skip_nonfinite, lo=0, hi=10**6, integer=True)
    if min_lr > args.lr:
        raise UserError(f"--min-lr ({min_lr}) is above --lr ({args.lr}).")
    if args.ckpt_every and not args.ckpt_dir:
        raise UserError("--ckpt-every needs --ckpt-dir.")
    adamw = AdamWConfig(beta1=args.beta1, beta2=args.beta2, eps=args.eps, weight_decay=args.weight_decay,
                        clip=args.clip)
    check_adamw(adamw, args.lr)
    for flag, path in (("--plan", args.plan), ("--data", args.data), ("--ckpt-dir", args.ckpt_dir),
                       ("--nvme-dir", args.nvme_dir), ("--metrics", args.metrics), ("--trace", args.trace),
                       ("--summary", args.summary), ("--init-from", args.init_from),
                       ("--tokenizer", args.tokenizer), ("--resume", args.resume or None)):
        if path is not None and not path.strip():
            raise UserError(f"{flag} is an empty path.")
    return TrainConfig(steps=steps, lr=args.lr, min_lr=min_lr, warmup=args.warmup, seed=args.seed,
                       adamw=adamw, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every, stop_after=args.stop_after,
                       nvme_dir=args.nvme_dir, init_from=args.init_from, metrics_path=args.metrics,
                       trace_path=args.trace, summary_path=args.summary, skip_nonfinite=args.skip_nonfinite,
                       quiet=args.quiet, force_cpu=args.cpu)


def rank_path(path: str | None, world) -> str | None:
    """Rank 0 writes `path`; rank r > 0 writes it with .rank<r> before the extension (m.jsonl -> m.rank1.jsonl)."""
    if path is None or world.leader:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{world.rank}{ext}"


def _launch(args, n: int) -> int:
    """--nproc-per-node N without torchrun's environment: check the plan, then run torchrun's launcher (this
    process is its agent) with the same arguments, less --nproc-per-node. Returns the first failed rank's exit
    code (128 + signal for a killed one), 0 when every rank succeeded."""
    check_positive("--nproc-per-node", n, integer=True, upper=1024)
    from runtime.dist import World, check_plan_world
    plan = load_plan(args.plan)
    check_plan_world(plan, World(size=n, local_size=n))
    if plan.cluster.nodes > 1:
        raise UserError(f"the plan is for {plan.cluster.nodes} nodes; start it on every node with torchrun "
                        f"(--nnodes {plan.cluster.nodes} --nproc-per-node {plan.cluster.gpus_per_node} "
                        "--rdzv-endpoint HOST:PORT), not --nproc-per-node.")
    argv, skip = [], False
    for a in getattr(args, "argv", None) or sys.argv[2:]:   # tools.cli puts the command line on args
        if skip:
            skip = False
        elif a.startswith("--nproc") and "=" not in a:
            skip = True
        elif not a.startswith("--nproc"):
            argv.append(a)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun
    try:
        torchrun(parse_args(["--nproc-per-node", str(n), "--standalone", "-m", "tools.cli", *argv]))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


def run(args) -> int:
    from runtime import dist, guards
    from runtime.data import TokenData
    from runtime.model import layouts_of, meta_layers
    from runtime.scratch import reclaim_scratch
    from runtime.store import Target
    from runtime.trainer import Trainer, train_settings
    from tools.simulate_cmd import check_writable

    world = dist.from_env()
    if args.nproc_per_node is not None and not world.distributed and "WORLD_SIZE" not in os.environ:
        return _launch(args, args.nproc_per_node)
    timeout_s = dist.check_timeout(args.dist_timeout)
    plan = load_plan(args.plan)
    dist.check_plan_world(plan, world)  # before anything waits for another rank
    if args.nproc_per_node is not None and args.nproc_per_node != world.local_size:
        raise UserError(f"--nproc-per-node {args.nproc_per_node} but torchrun started {world.local_size} ranks "
                        "on this node; drop --nproc-per-node under torchrun.")
    args.metrics, args.trace, args.summary = (rank_path(p, world) for p in (args.metrics, args.trace, args.summary))
    if not world.leader:
        args.quiet = True
    cfg = _config(args, plan)
    guards.check_supported(plan)
    guards.check_model(plan, args.init_from)
    check_writable(args.metrics, args.trace, args.summary)
    data = TokenData.open(args.data, seq_len=plan.shape.seq_len, seed=args.seed, tokenizer_dir=args.tokenizer,
                          dtype=args.data_dtype, order=args.data_order)
    guards.check_data(data, plan)
    if plan.method == "full" and plan.world > 1:  # full-parameter training on N ranks: FSDP2 (runtime/fsdp.py)
        from runtime import fsdp
        return fsdp.train(plan, data, cfg, world=world, resume=args.resume, allow_changes=args.allow_changes,
                          summary_path=args.summary, unsupported={"--trace": args.trace, "--nvme-dir": args.nvme_dir},
                          timeout_seconds=timeout_s)
    resume = guards.check_resume(plan, args.resume, args.ckpt_dir, world)  # this rank's view, re-cut if need be
    if resume is not None:
        changed = guards.check_settings(resume, train_settings(cfg, data), steps=cfg.steps,
                                        allow_changes=args.allow_changes)
        if changed and not args.quiet:
            print(f"resuming with changed settings (--allow-changes): {'; '.join(changed)}", file=sys.stderr)
    if world.distributed and not args.cpu:
        import torch
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)  # before Target.detect reads the current device
    target = Target.detect(force_cpu=args.cpu)
    dtype = str(target.weight_dtype).replace("torch.", "")
    if args.nvme_dir and os.path.isdir(args.nvme_dir):
        reclaim_scratch(args.nvme_dir)  # a killed run's scratch, before the free space is measured
    guards.check_nvme(plan, args.nvme_dir, guards.nvme_need_bytes(plan, dtype))
    guards.check_host_ram(guards.ram_need_bytes(plan, dtype, cuda=target.cuda))
    params = [lay.params for lay in layouts_of(meta_layers(plan.model))]
    done = resume.step if resume is not None else 0
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, done + cfg.stop_after)
    saves = 1 + ((end - done) // cfg.ckpt_every if cfg.ckpt_every else 0)
    guards.check_ckpt_dir(args.ckpt_dir, guards.checkpoint_bytes(plan, params, target.weight_dtype.itemsize), saves)
    guards.check_outputs(args.metrics, args.trace, args.summary)

    lock = guards.DirLock(args.ckpt_dir) if args.ckpt_dir and world.leader else None
    try:
        with dist.process_group(world, cuda=target.cuda, timeout_seconds=timeout_s):
            trainer = Trainer(plan, data, cfg, resume=resume, target=target, world=world)
            try:
                code = trainer.run()
            finally:
                trainer.close()
    finally:
        if lock:
            lock.release()
    if not args.quiet and trainer.history:
        last = trainer.history[-1]
        print(f"step {last['step']}/{cfg.steps}  loss {last['loss']:.4f}  "
              f"device peak {last['device_peak_bytes'] / 2**20:.1f} MiB")
    return code
