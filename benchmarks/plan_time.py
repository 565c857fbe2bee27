"""Wall time of the `plan` command, process start included, for the catalog models (median of --runs).

    python benchmarks/plan_time.py [--runs 3] [--models 7b,70b]

Each run is a fresh process, as a user types it. Profiles of catalog models ship with the package, so no
torch import happens; a model profiled for the first time (a local config.json) costs about 3 s more once.
"cpu s" is the process's user + system time (median): on a busy machine the wall time is not the plan's, the
CPU time nearly is. "work" is CP-SAT's deterministic time and "subproblems" the solves: the same on any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = [
    ("1b", ["--gpu", "rtx4090", "--vram", "24"]),
    ("7b", ["--gpu", "rtx4090", "--vram", "24"]),
    ("13b", ["--gpu", "rtx4090", "--vram", "24"]),
    ("70b", ["--gpu", "rtx4090", "--vram", "24", "--host-ram", "256", "--nvme", "2000"]),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default=",".join(m for m, _ in CASES), help="comma-separated (default: all)")
    a = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "plan")
    print(f"{'model':6} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>6}  {'gap':>6}  {'CP-SAT s':>8}  "
          f"{'work':>6}  subproblems")
    for model, args in [c for c in CASES if c[0] in a.models.split(",")]:
        walls, cpus, report = [], [], None
        for _ in range(a.runs):
            t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([exe, "--model", model, *args, "--json"], capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
            if r.returncode != 0:
                print(f"{model}: exit {r.returncode}: {r.stderr.strip()}")
                break
            report = json.loads(r.stdout)["solver"]
        if report:
            print(f"{model:6} {statistics.median(walls):9.2f} {min(walls):7.2f} {max(walls):7.2f} "
                  f"{statistics.median(cpus):6.2f}  {report['gap']:6.2%}  {report['solve_seconds']:8.2f}  "
                  f"{report['work']:6.3f}  {report['candidates']}")


if __name__ == "__main__":
    main()
