"""One rank of a data-parallel test run (tests/runtime/test_dist.py starts N of these, as torchrun would: RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment).

    python tests/runtime/dist_worker.py JOB.json

JOB.json: {"data": tokens path, "out": directory, "steps": n, "lr": .., "min_lr": .., "warmup": ..,
"weight_decay": .., "runs": {name: [plan path, clip, no_reduce_scatter]}}. For every run, in order, under one
process group: train `steps` steps (with no_reduce_scatter, as on a gloo build without reduce_scatter) and save
{losses, grad norms, final weights (HF names), the trace's net spans} to OUT/NAME.rank<r>.pt.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from planner.plan import load_plan
from runtime import dist
from runtime.data import TokenData
from runtime.optim import AdamWConfig
from runtime.trainer import TrainConfig, Trainer


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    world = dist.from_env()
    tc = TrainConfig(steps=job["steps"], lr=job["lr"], min_lr=job["min_lr"], warmup=job["warmup"], quiet=True,
                     force_cpu=True, trace_path=os.path.join(job["out"], "unused.json"),
                     # one directory per rank: on main two processes starting in one --nvme-dir can race (one
                     # reclaims the other's scratch before it is locked; helper dckpt's NvmeFiles fixes that)
                     nvme_dir=os.path.join(job["out"], f"nvme{world.rank}"),
                     adamw=AdamWConfig(weight_decay=job["weight_decay"]))
    with dist.process_group(world, cuda=False, timeout_seconds=60):
        for name, (plan_path, clip, no_reduce_scatter) in job["runs"].items():
            if no_reduce_scatter:
                import torch.distributed as tdist

                def unsupported(*args, **kw):
                    raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")
                tdist.reduce_scatter_single = tdist.reduce_scatter_tensor = unsupported
            plan = load_plan(plan_path)
            data = TokenData.open(job["data"], seq_len=plan.shape.seq_len, seed=0)
            cfg = dataclasses.replace(tc, adamw=dataclasses.replace(tc.adamw, clip=clip))
            tr = Trainer(plan, data, cfg, world=world)
            try:
                recs = [tr.step() for _ in range(tc.steps)]
                spans = [{k: sp[k] for k in ("kind", "layer", "bytes", "step", "block")}
                         for sp in tr.tracer.spans if sp["stream"] == "net"]
                out = {"losses": [r["loss"] for r in recs], "grad_norms": [r["grad_norm"] for r in recs],
                       "weights": tr.weights(), "spans": spans}
            finally:
                tr.close()
            torch.save(out, os.path.join(job["out"], f"{name}.rank{world.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
