"""BCD against full-parameter training on clusters, in tokens/s and dollars per billion tokens; how fast the
simulator times a 512-GPU plan; and the cheapest configuration for a token budget and a deadline.

    .venv/bin/python benchmarks/cluster_costs.py                 # the cost table, the scale figure, cheapest
    .venv/bin/python benchmarks/cluster_costs.py --skip-cheapest --host-ram 512

The table: Llama-2-7B, sequence 2048, 8 sequences per GPU per step (every rank keeps the one-GPU shape), each
configuration planned by the ILP (`plan --gpus N`; --fast: the fast planner, which does not shard BCD's state
and on 8 RTX 4090s sharing a host leaves about a fifth of the tokens/s) and simulated (simulator/sweep.py), on
  8 x RTX 4090 in one node (PCIe, no peer-to-peer: NCCL through host memory, planner/cluster.py's intra_link),
  8 x A100 80GB and 8 x A800 80GB in one node (NVLink 300 / 200 GB/s per direction),
  2 nodes of each (16 GPUs) over --interconnect-4090 and --interconnect-a100.
Dollars: catalog price per GPU-hour x GPUs (the A800's is the A100's, a stand-in). "scaling" is tokens/s per GPU
over one GPU's at the same shape; "wire" the bytes one rank sends per optimizer step. Full-parameter training
on N GPUs is what the planner makes of `--method full --gpus N` (FSDP/ZeRO-3 once planner/ prices it; before
that, plain data parallelism with the whole optimizer state on every rank).

The scale figure: a 7B BCD plan on 64 nodes x 8 A100s (512 ranks; one rank simulated stands for all), timed
building its schedule and simulating one step of every phase, best of --repeats. Timing figures on a shared
machine are noisy; re-measure on a quiet one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from planner.hardware import make_hardware  # noqa: E402
from planner.models import CATALOG  # noqa: E402
from planner.planning import Request  # noqa: E402
from planner.profile import profile_model  # noqa: E402
from planner.schedule import build_schedule  # noqa: E402
from simulator import cheapest, runner_ups, sweep  # noqa: E402
from simulator.cost import human_seconds  # noqa: E402
from simulator.engine import simulate  # noqa: E402
from simulator.periodic import simulate_repeating  # noqa: E402


def cost_table(a) -> None:
    layouts = [("rtx4090", 8, 1, None), ("a100-80g", 8, 1, None), ("a800-80g", 8, 1, None),
               ("rtx4090", 16, 2, a.interconnect_4090), ("a100-80g", 16, 2, a.interconnect_a100)]
    configs = [sweep.Config(model=a.model, gpu=g, vram_gib=None, method=m, seq_len=2048, batch=8,
                            host_ram_gib=a.host_ram, cpu_adam_params_per_s=a.cpu_adam, gpus=n, nodes=k,
                            interconnect=link, exact=not a.fast)
               for g, n, k, link in layouts for m in ("bcd", "full")]
    t0 = time.perf_counter()
    rows = sweep.run(configs, workers=a.workers)
    took = time.perf_counter() - t0
    print(f"\n{a.model}, sequence 2048, 8 sequences per GPU per step, host RAM {a.host_ram:g} GiB, "
          f"{'fast planner' if a.fast else 'the ILP (plan --gpus N)'}"
          f"{'' if a.cpu_adam is None else f', CPU AdamW {a.cpu_adam:g} params/s'} ({took:.1f} s)\n")
    print("| GPUs | link | method | tok/s | tok/s/GPU | scaling | wire MB/step | $/h | $/B tok | BCD/full | "
          "limited by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (g, n, k, link), pair in zip(layouts, zip(rows[::2], rows[1::2])):
        bcd, full = pair
        ratio = (full.tokens_per_s / bcd.tokens_per_s if bcd.fits and full.fits and bcd.tokens_per_s > 0 else None)
        where = f"{n} x {g}" if k == 1 else f"{k} nodes x {n // k} {g}"
        net = "NVLink" if g != "rtx4090" else "PCIe via host"
        net += f" + {link or 'eth100'}" if k > 1 else ""
        for r in (bcd, full):
            if not r.fits:
                print(f"| {where} | {net} | {r.method} | does not fit: {r.reason} | | | | | | | |")
                continue
            eff = "-" if r.scaling_efficiency is None else f"{r.scaling_efficiency:.0%}"
            per_h = "-" if r.price_per_hour is None else f"${r.price_per_hour * r.gpus:,.2f}"
            usd = "-" if r.usd_per_btok is None else f"${r.usd_per_btok:,.0f}"
            rat = "" if r.method == "full" or ratio is None else f"{ratio:.1%}"
            print(f"| {where} | {net} | {r.method} | {r.tokens_per_s:,.0f} | {r.tokens_per_s_per_gpu:,.0f} | {eff} | "
                  f"{r.wire_bytes_per_step / 1e6:,.1f} | {per_h} | {usd} | {rat} | {r.limited_by} |")
    print("\nscaling: tokens/s per GPU over one GPU's at the same shape. Full-parameter training on one GPU keeps "
          "its optimizer state in host RAM and steps it on the CPU; sharded over N GPUs (FSDP) it need not, hence "
          "figures far above 100%; BCD's sharded optimizer state frees device memory for resident weights, hence "
          "a few percent above. BCD/full: BCD's cost per token as a share of full-parameter training's.")


def scale(a) -> None:
    """One step of every phase of a 7B BCD plan on 64 x 8 A100s."""
    prof = profile_model(CATALOG["7b"])
    hw = make_hardware(gpu="a100-80g")
    plan1, why = sweep.fast_plan(prof, hw, Request(vram_gib=80.0, seq_len=2048, batch=8, time_limit_s=5.0))
    if plan1 is None:
        print(f"scale: no plan ({why})")
        return
    plan = cheapest.on_cluster(plan1, 512, 64, "ib-hdr")
    best_build = best_sim = best_rep = float("inf")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        sched = build_schedule(plan, prof)
        t1 = time.perf_counter()
        sim = simulate(plan, hw, profile=prof, schedule=sched, keep_timeline=False)
        t2 = time.perf_counter()
        simulate_repeating(plan, hw, profile=prof)
        t3 = time.perf_counter()
        best_build, best_sim, best_rep = min(best_build, t1 - t0), min(best_sim, t2 - t1), min(best_rep, t3 - t2)
    ops = sum(len(ph.ops) for ph in sched.phases)
    print(f"\nscale: 7B BCD on 64 nodes x 8 A100 80GB (ib-hdr), {len(plan.blocks)} blocks, {ops:,} ops in one step "
          f"of every phase: schedule built in {best_build:.3f} s, simulated in {best_sim:.3f} s (one step of "
          f"every phase: {best_build + best_sim:.3f} s in all; target <= 1 s); three micro-batches played and "
          f"extended (simulate_repeating, schedule included): {best_rep:.3f} s. {sim.tokens_per_s:,.0f} tokens/s, "
          f"{sim.wire_bytes_per_step / 1e6:,.1f} MB sent per rank per step; best of {a.repeats}.")


def cheapest_example(a) -> None:
    r = cheapest.search(a.model, 2e10, 72 * 3600.0, gpus_max=64, host_ram_gib=a.host_ram)
    w = r.winner
    print(f"\ncheapest --model {a.model} --tokens 2e10 --deadline 72h --gpus-max 64: "
          + ("none meets it" if w is None else
             f"{w.layout} {w.method}: {w.tokens_per_s:,.0f} tokens/s, {human_seconds(w.seconds)}, ${w.usd:,.0f}")
          + f" ({len(r.candidates)} configurations, {r.simulated} simulated, {r.plans} planner calls, "
            f"{r.wall_seconds:.1f} s)")
    for c, why in runner_ups.runner_ups(r, 3):
        print(f"  {c.layout if c.fits else c.gpu} {c.method}: {why}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b")
    ap.add_argument("--host-ram", type=float, default=256.0, help="host RAM the planner may use, GiB (default 256)")
    ap.add_argument("--cpu-adam", type=float, default=None, help="CPU AdamW params/s (default torch's 0.2e9)")
    ap.add_argument("--interconnect-4090", default="eth100", help="between RTX 4090 nodes (default eth100)")
    ap.add_argument("--interconnect-a100", default="ib-hdr", help="between A100/A800 nodes (default ib-hdr)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--fast", action="store_true", help="plan the table with the fast planner (default: the ILP, "
                                                        "which shards state and knows each rank's share of a node)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-cheapest", action="store_true")
    a = ap.parse_args()
    if not a.skip_table:
        cost_table(a)
    if not a.skip_scale:
        scale(a)
    if not a.skip_cheapest:
        cheapest_example(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
