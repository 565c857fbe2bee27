"""`blockfit simulate`: time a plan's schedule op by op, on its own hardware or on any other, without a GPU.

    blockfit simulate --plan p.json                              # per-phase step time, memory, bottleneck
    blockfit simulate --plan p.json --trace t.json --plot mem.png
    blockfit simulate --plan p.json --gpu a100-80g               # what if: this plan on another GPU
    blockfit simulate --plan p.json --vram 16 --pcie-gbps 12     # ... a smaller budget, a slower link
    blockfit simulate --plan p.json --gpu rtx3090 --replan       # ... or the planner's plan there
    blockfit simulate --plan p.json --hardware hw.json --json    # a calibrated profile; JSON summary
    blockfit simulate --plan p8.json --straggler 1.3             # a cluster plan with one rank 30% slower
    blockfit simulate --plan p8.json --slow-link 2               # ... or its network at half speed
"""
from __future__ import annotations

import argparse
import json
import os

from planner.errors import UserError
from planner.plan import load_plan, write_atomic
from planner.units import SIZE_HELP, size_gib


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="predict a plan's step time and memory on any hardware",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan JSON written by `plan --out`")
    p.add_argument("--trace", help="write the simulated Chrome trace JSON here")
    p.add_argument("--plot", help="write a PNG of device memory over one step of every phase here")
    p.add_argument("--summary", help="write the simulation summary JSON here (what `compare` reads)")
    g = p.add_argument_group("what if (the plan kept unless --replan)")
    g.add_argument("--gpu", help="another catalog GPU")
    g.add_argument("--hardware", help="a hardware profile written by `blockfit calibrate`")
    g.add_argument("--vram", help=f"VRAM budget ({SIZE_HELP})")
    g.add_argument("--pcie-gbps", type=float, help="host<->device GB/s, both directions")
    g.add_argument("--nvme-gbps", type=float, help="NVMe read and write GB/s")
    g.add_argument("--host-ram", help=f"host RAM ({SIZE_HELP})")
    g.add_argument("--micro-batch", type=int, help="micro-batch (the batch per step is kept)")
    g.add_argument("--seq", type=int, help="sequence length")
    g.add_argument("--straggler", type=float, help="one rank's GPU compute this many times slower (e.g. 1.3): "
                                                   "every collective waits for it")
    g.add_argument("--slow-link", type=float, help="the network's links this many times slower (e.g. 2)")
    g.add_argument("--replan", action="store_true", help="plan again for the new hardware and shape")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.set_defaults(func=run)


def check_writable(*paths) -> None:
    """Fail before any work when an output cannot be written."""
    for path in paths:
        if path is None:
            continue
        if not path.strip():
            raise UserError("an output path is empty; give a file name.")
        if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
            raise UserError(f"cannot write '{path}': it is not a regular file (a FIFO or a device).")
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise UserError(f"cannot write '{path}': directory '{d}' does not exist.")
        if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise UserError(f"cannot write '{path}': permission denied.")
        if os.path.isdir(path):
            raise UserError(f"cannot write '{path}': it is a directory.")


def run(a) -> int:
    from planner.profile import profile_model
    from simulator.chrome_trace import write_trace
    from simulator.engine import simulate
    from simulator.report import console, overflow_lines, plot_memory, render_simulation
    from simulator.whatif import Overrides, what_if

    check_writable(a.trace, a.plot, a.summary)
    plan = load_plan(a.plan)
    vram, host_ram = size_gib("--vram", a.vram, upper_gib=4096), size_gib("--host-ram", a.host_ram, upper_gib=65536)
    ov = Overrides(gpu=a.gpu, hardware_file=a.hardware, vram_gib=vram, pcie_gbps=a.pcie_gbps,
                   nvme_gbps=a.nvme_gbps, host_ram_gib=host_ram, micro_batch=a.micro_batch, seq_len=a.seq,
                   straggler=a.straggler, slow_link=a.slow_link)
    ov.skew()   # validated before any work
    prof = profile_model(plan.model)
    before = None
    if ov.any() or a.replan:
        before, sim = what_if(plan, ov, replan_=a.replan, profile=prof)
    else:
        sim = simulate(plan, profile=prof)
    summary = sim.summary()
    summary["fits"] = not sim.overflows()
    summary["overflows"] = [{"block": b, "bytes": o} for b, o in sim.overflows()]
    summary["overflow_messages"] = overflow_lines(sim)
    if before is not None:
        summary["baseline"] = {"gpu": before.hardware.gpu.id, "cycle_seconds": before.cycle_seconds,
                               "step_seconds_by_phase": {str(p.block): p.step_seconds for p in before.phases},
                               "tokens_per_s": before.tokens_per_s, "replanned": a.replan}
    if a.summary:
        write_atomic(a.summary, json.dumps(summary, indent=1))
    if a.trace:
        write_trace(a.trace, sim)
    if a.plot:
        plot_memory(a.plot, sim)
    if a.json:
        print(json.dumps(summary, indent=1))
        return 0
    con = console()
    if before is None:
        render_simulation(sim, con)
    else:
        what = "re-planned" if a.replan else "kept"
        render_simulation(sim, con, compare_planner=a.replan, title=f"What if (plan {what})")
        ratio = before.tokens_per_s / sim.tokens_per_s if sim.tokens_per_s > 0 else float("inf")
        con.print(f"as planned ({before.hardware.gpu.name}) the plan runs {before.tokens_per_s:,.0f} "
                  f"tokens/s; here {sim.tokens_per_s:,.0f} tokens/s ({1 / ratio:.2f}x)")
    for path, what in ((a.trace, "trace"), (a.plot, "memory plot"), (a.summary, "summary")):
        if path:
            con.print(f"{what} written to {path}")
    return 0
