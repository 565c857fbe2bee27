"""What a person reads: rich tables of a simulation, a sweep and the BCD-versus-full cost comparison, and the
memory-timeline plot."""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from planner.errors import UserError
from planner.hardware import GIB
from simulator.cost import hourly_price, human_seconds, token_budget
from simulator.network import STREAMS

SHORT = {"compute": "gpu", "h2d": "h2d", "d2h": "d2h", "nvme_read": "nvme r", "nvme_write": "nvme w",
         "cpu_opt": "cpu opt", "net": "net"}


def console() -> Console:
    """A console for command output: the terminal's width, or 160 columns when piped (rich would take 80)."""
    c = Console()
    return c if c.is_terminal else Console(width=160)


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.005 else "-"


def _money(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"${x:,.{digits}f}"


def render_simulation(sim, console: Console, *, compare_planner: bool = True, title: str = "") -> None:
    """One row per phase: step time (and the planner's own estimate when the hardware is the plan's),
    switch time, peak memory, utilisation per stream, and the bottleneck in words."""
    plan, hw = sim.plan, sim.hardware
    s = plan.shape
    console.print(f"[bold]{title or 'Simulated plan'}[/bold]: {plan.model.name} ({plan.method}) on {hw.gpu.name}"
                  f"{' (calibrated)' if hw.calibrated else ''}; {len(plan.blocks)} block(s), micro-batch "
                  f"{s.micro_batch} x {s.grad_accum} accumulation x {s.seq_len} tokens, "
                  f"{plan.steps_per_block} steps per block")
    if plan.world > 1 or sim.skew.straggler != 1.0:
        console.print(cluster_line(sim))
    t = Table()
    t.add_column("phase", justify="right")
    t.add_column("layers")
    t.add_column("step s", justify="right")
    if compare_planner:
        t.add_column("planner s", justify="right")
        t.add_column("diff", justify="right")
    t.add_column("switch s", justify="right")
    t.add_column("peak GiB", justify="right")
    busy = [x for x in STREAMS if any(p.utilisation[x] > 0 for p in sim.phases)]
    for x in busy:
        t.add_column(SHORT[x], justify="right")
    t.add_column("bottleneck")
    pred = {p.block: p for p in plan.predicted.phases}
    cap = sim.cap_bytes
    for p in sim.phases:
        b = plan.blocks[p.block]
        row = [str(p.block), f"{b.first}-{b.last}", f"{p.step_seconds:.4g}"]
        if compare_planner:
            ps = pred[p.block].step_seconds if p.block in pred else 0.0
            row += [f"{ps:.4g}", f"{(p.step_seconds / ps - 1):+.1%}" if ps > 0 else "-"]
        peak = _gib(p.peak_bytes)
        row += [f"{p.switch_seconds:.3g}", f"[red]{peak}[/red]" if p.peak_bytes > cap else peak]
        row += [_pct(p.utilisation[x]) for x in busy]
        row.append(p.bottleneck)
        t.add_row(*row)
    console.print(t)
    over = sim.overflows()
    console.print(f"cycle {human_seconds(sim.cycle_seconds)} ({sim.cycle_seconds:.4g} s), "
                  f"{sim.tokens_per_s:,.0f} tokens/s over the cycle; peak {_gib(sim.peak_bytes)} GiB of "
                  f"{_gib(cap)} GiB usable ({plan.budget_bytes / GIB:g} GiB budget less "
                  f"{plan.reserve_bytes / GIB:g} GiB reserve)" + ("" if over else ": fits"))
    for line in overflow_lines(sim):
        console.print(f"[red]{line}[/red]")


def cluster_line(sim) -> str:
    """The cluster, its links, the bytes on the wire and the what-if in force, in one sentence."""
    plan, c = sim.plan, sim.plan.cluster
    links = [f"{lk.name} {lk.gbps:g} GB/s" for lk in (c.intra, c.inter) if lk is not None]
    out = (f"{plan.world} GPU(s) on {c.nodes} node(s)" + (f" ({', '.join(links)})" if links else "")
           + f", data parallel{' with sharded optimizer state' if plan.shard_state else ''}; "
           f"{sim.wire_bytes_per_step / 1e6:,.1f} MB sent per rank per step")
    if sim.skew.straggler != 1.0 and plan.world == 1:
        out += f"; its compute {sim.skew.straggler:g}x slower (one GPU: no collective to wait at)"
    elif sim.skew.straggler != 1.0:
        out += f"; one straggler at {sim.skew.straggler:g}x compute (every rank waits for it at each collective)"
    if sim.skew.slow_link != 1.0:
        out += f"; network links {sim.skew.slow_link:g}x slower"
    return out


def overflow_lines(sim) -> list[str]:
    """One sentence per phase that does not fit: which phase, its peak, and by how much it overflows."""
    plan = sim.plan
    out = []
    for block, over in sim.overflows():
        b = plan.blocks[block]
        p = next(x for x in sim.phases if x.block == block)
        out.append(f"does not fit: phase {block} (block of layers {b.first}-{b.last}) peaks at {_gib(p.peak_bytes)} "
                   f"GiB, {_gib(over)} GiB over the {_gib(sim.cap_bytes)} GiB usable "
                   f"({plan.budget_bytes / GIB:g} GiB budget less {plan.reserve_bytes / GIB:g} GiB reserve)")
    return out


def plot_memory(path: str, sim) -> None:
    """Device memory over one step of every phase, with the usable budget as a line."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UserError(f"cannot write '{path}': directory '{d}' does not exist or is not writable.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for p in sim.phases:
        if p.memory_seconds:
            xs, ys = [0.0], [p.memory_bytes[0] / GIB]
            for t, b in zip(p.memory_seconds, p.memory_bytes):
                xs += [t, t]
                ys += [ys[-1], b / GIB]
            ax.plot(xs, ys, lw=1, label=f"phase {p.block}")
    ax.axhline(sim.cap_bytes / GIB, color="red", ls="--", lw=1, label="budget less reserve")
    ax.set_xlabel("seconds into the step")
    ax.set_ylabel("device memory (GiB)")
    ax.set_title(f"{sim.plan.model.name} on {sim.hardware.gpu.name}: simulated device memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure as PNG and close it; an unwritable path is the user's error."""
    import matplotlib.pyplot as plt
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror}.") from None
    finally:
        plt.close(fig)


def _layout(r) -> str:
    return f"{r.gpus}" if r.nodes == 1 else f"{r.nodes}x{r.gpus // r.nodes}"


def render_sweep(rows, console: Console, *, tokens: float | None = None) -> None:
    cluster = any(r.gpus > 1 for r in rows)
    t = Table(title="Sweep (each configuration planned, then simulated)")
    cols = [("model", "left"), ("gpu", "left")] + ([("GPUs", "right")] if cluster else []) + [
        ("vram", "right"), ("method", "left"), ("mb", "right"), ("blocks", "right"), ("streamed", "right"),
        ("state", "left"), ("step s", "right"), ("tokens/s", "right")]
    cols += [("tok/s/GPU", "right"), ("scaling", "right"), ("wire MB/step", "right")] if cluster else []
    cols += [("peak GiB", "right"), ("$/h", "right"), ("$/B tok", "right")]
    for c, j in cols:
        t.add_column(c, justify=j)
    if tokens:
        t.add_column(f"time for {tokens:.3g} tok", justify="right")
        t.add_column("cost", justify="right")
    t.add_column("limited by / why not")
    for r in rows:
        row = [r.model, r.gpu] + ([_layout(r)] if cluster else []) + [f"{r.vram_gib:g}", r.method]
        price = _money(None if r.price_per_hour is None else r.price_per_hour * r.gpus)
        if r.fits:
            row += [str(r.micro_batch), str(r.blocks), str(r.streamed_layers), r.state_tier, f"{r.step_seconds:.3g}",
                    f"{r.tokens_per_s:,.0f}"]
            if cluster:
                eff = "-" if r.scaling_efficiency is None else f"{r.scaling_efficiency:.0%}"
                row += [f"{r.tokens_per_s_per_gpu:,.0f}", eff, f"{r.wire_bytes_per_step / 1e6:,.1f}"]
            row += [f"{r.peak_gib:.1f}", price, _money(r.usd_per_btok, 0)]
            if tokens:
                secs, usd = token_budget(tokens, r.tokens_per_s, r.price_per_hour, r.gpus)
                row += [human_seconds(secs), _money(usd, 0)]
            row.append(r.limited_by)
        else:
            row += ["-"] * (10 if cluster else 7) + [price, "-"] + (["-", "-"] if tokens else []) + [r.reason]
        t.add_row(*row)
    console.print(t)
    if cluster:
        console.print("  GPUs: in all, or nodes x GPUs per node; $/h for all of them. Each GPU keeps the one-GPU "
                      "shape (--batch per GPU); scaling: tokens/s per GPU over one GPU's; wire: bytes one rank "
                      "sends per step.")


def cost_rows(rows) -> list[dict]:
    """BCD and full side by side per (model, GPU, budget): tokens/s, $/B tokens and BCD's cost relative to full
    (the ratio of the two times, so it needs no price)."""
    pairs: dict[tuple, dict] = {}
    for r in rows:
        pairs.setdefault((r.model, r.gpu, r.vram_gib, r.gpus, r.nodes), {})[r.method] = r
    out = []
    for (model, gpu, vram, gpus, nodes), d in pairs.items():
        bcd, full = d.get("bcd"), d.get("full")
        price = hourly_price(gpu)
        ratio = None
        if bcd and full and bcd.fits and full.fits and bcd.tokens_per_s > 0:
            ratio = full.tokens_per_s / bcd.tokens_per_s
        out.append(dict(model=model, gpu=gpu, vram_gib=vram, gpus=gpus, nodes=nodes, price_per_hour=price.per_hour,
                        price_note=price.note, bcd=bcd, full=full, ratio=ratio))
    return out


def render_costs(rows, console: Console) -> None:
    models = sorted({r.model for r in rows})
    t = Table(title=f"BCD versus full-parameter training, {', '.join(models)}: simulated cost per billion tokens")
    cluster = any(r.gpus > 1 for r in rows)
    for c in ("gpu",) + (("GPUs",) if cluster else ()) + ("vram", "$/h", "BCD tok/s", "BCD $/Btok", "full tok/s",
                                                         "full $/Btok", "BCD/full", "full limited by"):
        t.add_column(c, justify="left" if c in ("gpu", "full limited by") else "right")
    notes = []
    for c in cost_rows(rows):
        bcd, full = c["bcd"], c["full"]

        def cells(r):
            if r is None:
                return ["-", "-"]
            if not r.fits:
                return ["no fit", "-"]
            return [f"{r.tokens_per_s:,.0f}", _money(r.usd_per_btok, 0)]
        price = _money(c["price_per_hour"]) + ("*" if c["price_note"] and c["price_per_hour"] else "")
        if c["price_note"]:
            notes.append(f"{c['gpu']}: {c['price_note']}")
        limit = full.limited_by if full and full.fits else (full.reason if full else "-")
        where = [(bcd or full) and _layout(bcd or full)] if cluster else []
        t.add_row(c["gpu"] + ("" if len(models) == 1 else f" ({c['model']})"), *where, f"{c['vram_gib']:g}", price,
                  *cells(bcd), *cells(full), "-" if c["ratio"] is None else f"{c['ratio']:.1%}", limit)
    console.print(t)
    for n in dict.fromkeys(notes):
        console.print(f"  * {n}")
    console.print("  BCD/full: BCD's cost per token as a share of full-parameter training's on the same GPU "
                  "(the ratio of their times, so no price is needed)." + (" $/h is per GPU; $/Btok counts every GPU."
                                                                           if cluster else ""))
