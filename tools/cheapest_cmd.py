"""`blockfit cheapest`: the cheapest cluster that trains a model on a token budget before a deadline.

    blockfit cheapest --model 7b --tokens 2e10 --deadline 72h
    blockfit cheapest --model 7b --tokens 2e10 --deadline 72h --gpus-max 64 --gpus rtx4090,a100-80g,h100-sxm
    blockfit cheapest --model 13b --tokens 5e9 --deadline 3d --method bcd --interconnect ib-hdr --json

Searches catalog GPUs (those with a price) x GPU counts (powers of two up to --gpus-max) x node layouts (1, 2, 4
or 8 GPUs a node) x method (BCD and full-parameter); each configuration is planned by the fast planner,
simulated and priced (GPU-hours x the catalog's price). Prints the winner, the runner-ups and why each loses;
exits 2 when no configuration meets the deadline. See simulator/cheapest.py.
"""
from __future__ import annotations

import argparse
import json

from planner.errors import UserError, check_positive
from planner.units import SIZE_HELP, size_gib


def register(subparsers) -> None:
    p = subparsers.add_parser("cheapest", help="the cheapest GPUs x count x method that meets a deadline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="catalog model (7b, 13b, ...) or a config.json path")
    p.add_argument("--tokens", required=True, type=float, help="tokens to train on, e.g. 2e10")
    p.add_argument("--deadline", required=True, help="wall-clock limit: 72h, 3d, 90min, 4500s (bare: hours)")
    p.add_argument("--gpus-max", type=int, default=64, help="most GPUs in all (default 64)")
    p.add_argument("--gpus", help="comma-separated catalog GPUs to consider (default: every priced one)")
    p.add_argument("--per-node", type=int, default=8, help="most GPUs in a node (default 8)")
    p.add_argument("--method", default="bcd,full", help="bcd, full, or both comma-separated (default both)")
    p.add_argument("--interconnect", help="link between nodes (default the planner's)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (capped at the model's maximum)")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step of each GPU (default 8)")
    p.add_argument("--host-ram", help=f"host RAM ({SIZE_HELP}; default 64)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--runner-ups", type=int, default=5, help="other GPU-and-method choices to print, of those that "
                                                             "meet the deadline and of those that miss it (default 5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _names(s: str, flag: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    if not out:
        raise UserError(f"{flag} is an empty list.")
    return out


def run(a) -> int:
    from simulator import cheapest, runner_ups
    from simulator.cost import human_seconds
    from simulator.report import console

    check_positive("--runner-ups", a.runner_ups + 1, integer=True, upper=1001)
    check_positive("--workers", a.workers, integer=True, upper=256)
    deadline = cheapest.parse_deadline(a.deadline)
    host_ram = size_gib("--host-ram", a.host_ram, upper_gib=65536)
    r = cheapest.search(a.model, a.tokens, deadline, gpus=_names(a.gpus, "--gpus") if a.gpus else None,
                        gpus_max=a.gpus_max, per_node_max=a.per_node, methods=tuple(_names(a.method, "--method")),
                        seq_len=a.seq, batch_per_gpu=a.batch, host_ram_gib=host_ram, interconnect=a.interconnect,
                        workers=a.workers)
    if r.winner is None:
        raise runner_ups.none_meets(r)
    if a.json:
        print(json.dumps(runner_ups.to_dict(r), indent=1))
        return 0
    from rich.table import Table
    con = console()
    w = r.winner
    con.print(f"[bold]Cheapest[/bold] way to train {r.model} on {r.tokens:.3g} tokens within "
              f"{a.deadline.strip()}: [bold]{w.layout}, {_method(w.method)}[/bold]: "
              f"{w.tokens_per_s:,.0f} tokens/s, {human_seconds(w.seconds)}, ${w.usd:,.0f} "
              f"(${w.per_hour:.2f} per GPU-hour)")
    t = Table(title="Runner-ups and why they lose")
    for c, j in (("GPUs", "left"), ("method", "left"), ("tokens/s", "right"), ("time", "right"),
                 ("cost", "right"), ("why it loses", "left")):
        t.add_column(c, justify=j)
    for c, why in runner_ups.runner_ups(r, a.runner_ups):
        sim = c.fits and c.tokens_per_s > 0
        t.add_row(c.layout if c.fits else f"{c.gpu} (any count)", _method(c.method),
                  f"{c.tokens_per_s:,.0f}" if sim else "-", human_seconds(c.seconds) if sim else "-",
                  f"${c.usd:,.0f}" if sim else "-", why)
    con.print(t)
    if r.skipped_gpus:
        con.print(f"  not searched (no price in the catalog): {', '.join(r.skipped_gpus)}")
    con.print(f"  {len(r.candidates)} configurations, {r.simulated} simulated, {r.plans} planner calls, "
              f"{r.wall_seconds:.1f} s")
    return 0


def _method(m: str) -> str:
    return "BCD" if m == "bcd" else "full-parameter"
