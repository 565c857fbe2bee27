"""`blockfit sweep`: plan and simulate a grid of models x GPUs x VRAM budgets (x methods), in parallel.

    blockfit sweep --model 7b --gpu rtx4090,a100-80g,a800-80g --compare-methods --host-ram 256
    blockfit sweep --model 1b,7b,13b --gpu rtx3090,rtx4090,l40s --vram 8,12,16,24 --csv sweep.csv --plot sweep.png
    blockfit sweep --model 7b --gpu all --tokens 1e9            # time and dollars for a billion tokens
    blockfit sweep --model 7b --gpu rtx4090 --vram 12,24 --exact   # the real ILP per configuration (slow)
    blockfit sweep --model 7b --gpu rtx4090,a100-80g --gpus 1,2,4,8 --nodes 1,2,4   # clusters: scaling, wire bytes
    blockfit sweep --model 7b --gpu rtx4090,a100-80g --gpus 8 --compare-methods      # BCD vs full (FSDP) on 8 GPUs

Each configuration is planned by a fast enumeration priced with the ILP's own tables (or by the ILP with
--exact) and simulated by the engine; see simulator/sweep.py for why.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from planner.errors import UserError, check_positive
from planner.units import SIZE_HELP, size_gib


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="plan and simulate many configurations; cost per billion tokens",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="comma-separated models (7b,8b,... or config.json paths)")
    p.add_argument("--gpu", required=True, help="comma-separated catalog GPUs, or 'all'")
    p.add_argument("--vram", help=f"comma-separated budgets ({SIZE_HELP}; default: each card's VRAM); a:b:step "
                                  "for a range")
    p.add_argument("--method", default="bcd", help="bcd, full, or both comma-separated (default bcd)")
    p.add_argument("--compare-methods", action="store_true", help="BCD and full side by side, with costs")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (capped at the model's maximum)")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step of each GPU (a cluster of N "
                                                        "trains N times as many: every rank keeps the one-GPU shape)")
    p.add_argument("--gpus", default="1", help="comma-separated GPU counts, in all (data parallel; default 1)")
    p.add_argument("--nodes", default="1", help="comma-separated node counts; pairs with --gpus that do not split "
                                                "evenly are left out (default 1)")
    p.add_argument("--interconnect", help="link between nodes (eth25, eth100, eth200, eth400, ib-hdr, ib-ndr; "
                                          "default the planner's)")
    p.add_argument("--host-ram", help=f"host RAM ({SIZE_HELP}; default 64)")
    p.add_argument("--blocks", type=int, help="fix BCD's number of blocks (default: the planner's choice, the "
                                              "count with the most tokens per second)")
    p.add_argument("--cpu-adam", type=float, help="CPU AdamW parameters per second (default 0.2e9, torch's)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--exact", action="store_true", help="solve the ILP for every configuration (slow)")
    p.add_argument("--tokens", type=float, help="also show the time and cost of training on this many tokens")
    p.add_argument("--csv", help="write every row as CSV here")
    p.add_argument("--plot", help="write a PNG of tokens/s against the VRAM budget here")
    p.add_argument("--json", action="store_true", help="print rows as JSON")
    p.set_defaults(func=run)


def _names(s: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    if not out:
        raise UserError(f"empty list '{s}'.")
    return out


def _counts(flag: str, s: str) -> list[int]:
    out = []
    for x in _names(s):
        try:
            v = int(x)
        except ValueError:
            raise UserError(f"{flag} takes whole numbers separated by commas, got '{x}'.") from None
        if not 1 <= v <= 1 << 16:
            raise UserError(f"{flag} values must be between 1 and 65536, got {v}.")
        out.append(v)
    return list(dict.fromkeys(out))


def parse_vram(s: str | None) -> list[float | None]:
    if s is None:
        return [None]
    if ":" in s:
        parts = s.split(":")
        if len(parts) != 3:
            raise UserError(f"--vram must be sizes separated by commas, or start:stop:step; got '{s}'.")
        a, b, step = (size_gib("--vram", x, upper_gib=4096) for x in parts)
        if b < a:
            raise UserError(f"--vram {s}: the range ends below its start.")
        n = int(round((b - a) / step)) + 1
        if n > 100_000:
            raise UserError(f"--vram {s} makes {n} budgets; that is too many.")
        return [round(a + k * step, 6) for k in range(n)]
    return [size_gib("--vram", x, upper_gib=4096) for x in _names(s)]


def run(a) -> int:
    from planner.hardware import gpu_names
    from simulator import sweep
    from simulator.report import console, cost_rows, render_costs, render_sweep
    from tools.simulate_cmd import check_writable

    check_writable(a.csv, a.plot)
    check_positive("--workers", a.workers, integer=True, upper=256)
    check_positive("--seq", a.seq, integer=True, upper=1 << 20)
    check_positive("--batch", a.batch, integer=True, upper=1 << 16)
    host_ram = size_gib("--host-ram", a.host_ram, upper_gib=65536)
    check_positive("--tokens", a.tokens, upper=1e18)
    check_positive("--cpu-adam", a.cpu_adam, upper=1e12)
    check_positive("--blocks", a.blocks, integer=True, upper=10**4)
    gpus = gpu_names() if a.gpu.strip() == "all" else _names(a.gpu)
    methods = ["bcd", "full"] if a.compare_methods else _names(a.method)
    configs = sweep.grid(_names(a.model), gpus, parse_vram(a.vram), methods, seq_len=a.seq, batch=a.batch,
                         host_ram_gib=host_ram, cpu_adam_params_per_s=a.cpu_adam, blocks=a.blocks, exact=a.exact,
                         counts=_counts("--gpus", a.gpus), nodes=_counts("--nodes", a.nodes),
                         interconnect=a.interconnect)
    rows = sweep.run(configs, workers=a.workers)
    if a.csv:
        sweep.write_csv(a.csv, rows)
    if a.plot:
        sweep.plot(a.plot, rows)
    if a.json:
        out = {"rows": [asdict(r) for r in rows]}
        if a.compare_methods:
            out["bcd_vs_full"] = [{k: v for k, v in c.items() if k not in ("bcd", "full")} for c in cost_rows(rows)]
        print(json.dumps(out, indent=1))
        return 0
    con = console()
    if a.compare_methods:
        render_costs(rows, con)
    else:
        render_sweep(rows, con, tokens=a.tokens)
    fits = sum(r.fits for r in rows)
    con.print(f"{len(rows)} configurations, {fits} fit" + (f"; rows written to {a.csv}" if a.csv else "")
              + (f"; plot written to {a.plot}" if a.plot else ""))
    return 0
