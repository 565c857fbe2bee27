"""`blockfit compare`: measured against predicted, per phase, per stream and per op.

    blockfit train --plan p.json --data d.bin --steps 20 --trace measured.json --summary measured-summary.json
    blockfit simulate --plan p.json --trace simulated.json --summary simulated-summary.json
    blockfit compare measured.json simulated.json                  # two Chrome traces
    blockfit compare measured-summary.json simulated-summary.json  # or two summaries
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare a measured trace or summary with a simulated one",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("measured", help="the runtime's trace or summary JSON")
    p.add_argument("predicted", help="the simulator's trace or summary JSON")
    p.add_argument("--top", type=int, default=15, help="ops with the largest differences to list")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=run)


def run(a) -> int:
    from planner.errors import UserError
    from simulator.compare import compare, load, render, to_dict
    from simulator.report import console
    if a.top < 0:
        raise UserError(f"--top must be 0 or more, got {a.top}.")
    c = compare(load(a.measured), load(a.predicted))
    if a.json:
        print(json.dumps(to_dict(c), indent=1))
    else:
        render(c, console(), top=a.top)
    return 0
