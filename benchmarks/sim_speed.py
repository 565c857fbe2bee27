"""How fast the simulator is: one step of every phase of a 7B plan, and a 1,000-configuration sweep.

    .venv/bin/python benchmarks/sim_speed.py            # both figures
    .venv/bin/python benchmarks/sim_speed.py --workers 2 --repeats 20

Targets: <= 50 ms for the 7B plan (the engine alone: the schedule is the planner's and is built once), and
<= 30 s for the sweep on 2 cores (models 1b, 7b, 8b, 13b x the 10 catalog GPUs x 25 VRAM budgets from 4 to
23.2 GiB, BCD; every configuration planned by the fast planner and simulated, see simulator/sweep.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from planner.hardware import gpu_names, make_hardware  # noqa: E402
from planner.models import CATALOG  # noqa: E402
from planner.planning import Request, make_plan  # noqa: E402
from planner.profile import profile_model  # noqa: E402
from planner.schedule import build_schedule  # noqa: E402
from simulator import sweep  # noqa: E402
from simulator.engine import simulate  # noqa: E402


def engine_7b(repeats: int) -> None:
    cfg = CATALOG["7b"]
    prof = profile_model(cfg)
    # the planner's plan for 7B in 24 GiB of an RTX 4090: weights streamed, several blocks, thousands of ops
    plan = make_plan(cfg, make_hardware(gpu="rtx4090"), Request(vram_gib=24, seq_len=2048, batch=8, time_limit_s=5),
                     prof)
    t0 = time.perf_counter()
    sched = build_schedule(plan, prof)
    build_ms = (time.perf_counter() - t0) * 1e3
    n_ops = sum(len(p.ops) for p in sched.phases)
    simulate(plan, schedule=sched)   # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        simulate(plan, schedule=sched)
        best = min(best, time.perf_counter() - t0)
    print(f"7B plan ({len(plan.blocks)} phases, {n_ops} ops, micro-batch {plan.shape.micro_batch} x "
          f"{plan.shape.grad_accum}): one step of every phase simulated in {best * 1e3:.1f} ms "
          f"(target <= 50 ms; best of {repeats}; the planner builds its schedule in {build_ms:.0f} ms)")


def sweep_1000(workers: int) -> None:
    models = ["1b", "7b", "8b", "13b"]
    vrams = [round(4 + 0.8 * k, 1) for k in range(25)]
    configs = sweep.grid(models, gpu_names(), vrams, ["bcd"])
    t0 = time.perf_counter()
    for m in models:
        profile_model(CATALOG[m])   # measured once, then read from the disk cache
    prof_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = sweep.run(configs, workers=workers)
    secs = time.perf_counter() - t0
    print(f"sweep of {len(configs)} configurations ({len(models)} models x {len(gpu_names())} GPUs x {len(vrams)} "
          f"budgets) on {workers} worker processes: {secs:.1f} s (target <= 30 s); {sum(r.fits for r in rows)} fit; "
          f"profiles {prof_s:.1f} s beforehand (disk cache)")


def _burn(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def cores_free(workers: int) -> float:
    """How many times faster `workers` processes burn pure Python than one: the cores this run really had."""
    from concurrent.futures import ProcessPoolExecutor
    t0 = time.perf_counter()
    for _ in range(workers):
        _burn(2_000_000)
    one = time.perf_counter() - t0
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_burn, [10] * workers))   # start the workers first
        t0 = time.perf_counter()
        list(ex.map(_burn, [2_000_000] * workers))
        many = time.perf_counter() - t0
    return one / many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    engine_7b(a.repeats)
    free = cores_free(a.workers)
    sweep_1000(a.workers)
    print(f"(CPU check before the sweep: {a.workers} processes ran {free:.2f}x faster than one; below "
          f"{a.workers} means the machine was shared)")


if __name__ == "__main__":
    main()
