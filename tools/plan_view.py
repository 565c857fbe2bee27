"""Rich tables for a plan: blocks, placements, the worst phase's memory against the budget, speed, solver."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from planner.errors import UserError
from planner.hardware import GIB
from planner.plan import Plan
from planner.wear import days_to_wear_out, wear_warning


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _runs(plan: Plan):
    """Consecutive layers with the same placement, as (first, last, placement)."""
    out = []
    trained = {i for b in plan.blocks for i in b.layers}
    for p in plan.placements:
        frozen = p.layer not in trained
        key = (p.weights, "-" if p.layer == 0 else p.activations, "frozen" if frozen else p.master,
               "-" if frozen else p.grads)
        if out and out[-1][2] == key:
            out[-1][1] = p.layer
        else:
            out.append([p.layer, p.layer, key])
    return out


def _layer_name(plan: Plan, i: int) -> str:
    return "embedding" if i == 0 else "head" if i == plan.n_layers - 1 else f"L{i}"


def show_plan(plan: Plan, prof, console: Console | None = None) -> None:
    c = console or Console()
    pred = plan.predicted
    params = prof.total_params
    hw = plan.hardware
    c.print(f"[bold]{plan.model.name}[/] ({params / 1e9:.2f} B params) on {hw.gpu.name}, "
            f"budget {_gib(plan.budget_bytes)} GiB ({_gib(plan.reserve_bytes)} reserved), method {plan.method}; "
            f"micro-batch {plan.shape.micro_batch} x {plan.shape.grad_accum} accumulation"
            + (f" x {plan.world} GPUs" if plan.world > 1 else "") + f", sequence {plan.shape.seq_len}")
    if plan.world > 1:
        show_cluster(plan, c)

    t = Table(title="Blocks (trained one at a time)", title_justify="left")
    net = plan.world > 1
    for col in ("block", "layers", "params", "peak VRAM GiB" + (" per GPU" if net else ""), "step s", "tokens/s") + (
            ("wire GB/step", "network share") if net else ()):
        t.add_column(col, justify="right")
    tok = plan.shape.tokens_per_step
    for b, ph in zip(plan.blocks, pred.phases):
        n = sum(prof.layers[i].params for i in b.layers)
        t.add_row(str(ph.block), f"{_layer_name(plan, b.first)}-{_layer_name(plan, b.last)}", f"{n / 1e6:.0f} M",
                  _gib(ph.peak_vram_bytes), f"{ph.step_seconds:.2f}", f"{tok / ph.step_seconds:,.0f}",
                  *((f"{ph.wire_bytes_per_step / 1e9:,.2f}", f"{_net_share(ph):.0%}") if net else ()))
    c.print(t)

    t = Table(title="Where each tensor class lives", title_justify="left")
    for col in ("layers", "bf16 weights", "activations", "master + moments", "grads"):
        t.add_column(col)
    for first, last, (w, a, m, g) in _runs(plan):
        span = _layer_name(plan, first) + ("" if first == last else f"-{_layer_name(plan, last)}")
        t.add_row(span, w, a, m, g)
    c.print(t)

    worst = max(pred.phases, key=lambda p: p.peak_vram_bytes)
    t = Table(title=f"Worst phase (block {worst.block}) against the budget", title_justify="left")
    t.add_column("class")
    t.add_column("GiB", justify="right")
    for k, v in sorted(worst.breakdown.items(), key=lambda kv: -kv[1]):
        if v:
            t.add_row(k, _gib(v))
    t.add_row("[bold]peak[/]", f"[bold]{_gib(worst.peak_vram_bytes)}[/]")
    t.add_row("reserve", _gib(plan.reserve_bytes))
    t.add_row("budget", _gib(plan.budget_bytes))
    c.print(t)

    w = pred.nvme_write_bytes_per_day
    if w > 0:
        tbw = hw.host.nvme_tbw
        c.print(f"NVMe writes: {pred.nvme_write_bytes_per_step / 1e9:,.1f} GB per optimizer step, {w / 1e12:,.2f} TB "
                f"per day at the predicted rate; a {tbw:,.0f} TBW drive takes that for "
                f"{days_to_wear_out(w, tbw):,.0f} days")
        warning = wear_warning(w, tbw)
        if warning:
            c.print(f"[bold yellow]warning:[/] {warning}")
    s = plan.solver
    per_node = " per node" if plan.world > 1 else ""
    c.print(f"predicted: {pred.tokens_per_s:,.0f} tokens/s averaged over a cycle of {len(plan.blocks)} blocks x "
            f"{plan.steps_per_block} steps ({pred.cycle_seconds / 60:.1f} min); host RAM {_gib(pred.host_ram_bytes)} "
            f"GiB{per_node}, NVMe {_gib(pred.nvme_bytes)} GiB{per_node}; prefetch window "
            f"{_gib(plan.prefetch_window_bytes)} GiB")
    goal = ("most tokens/s" if s.objective_kind == "tokens" else "shortest cycle") if s.status != "HEURISTIC" else ""
    c.print(f"solver: {s.status}{', ' + goal if goal else ''}, gap {s.gap:.2%}, {s.solve_seconds:.2f} s in CP-SAT "
            f"over {s.candidates} subproblem solves (micro-batch x block count x state tier), work {s.work:.2f} of "
            f"{s.work_limit:.2f} deterministic s")
    if s.wall_capped:
        c.print(f"[bold yellow]warning:[/] the {s.time_limit_s:g} s wall-clock safety net stopped the search before "
                f"its deterministic work budget: this plan may differ on another machine or under another load "
                f"(raise --time-limit, or lower --work-limit)")


def _net_share(ph) -> float:
    """Of a step, the share the network is busy (it partly overlaps backward)."""
    return min(1.0, ph.net_seconds / ph.step_seconds) if ph.step_seconds > 0 else 0.0


def show_cluster(plan: Plan, c: Console) -> None:
    """The cluster, its links, what each GPU and each node holds, and what the network carries per step."""
    cl, pred = plan.cluster, plan.predicted
    links = []
    if cl.intra is not None:
        links.append(f"within a node {cl.intra.name} {cl.intra.gbps:.3g} GB/s per GPU per direction")
    if cl.inter is not None:
        links.append(f"between nodes {cl.inter.name} {cl.inter.gbps:.3g} GB/s per port x {cl.ports_per_node} "
                     f"port(s) a node")
    if plan.method == "full":
        how = "FSDP / ZeRO-3: weights, gradients and optimizer state sharded over every GPU"
    elif plan.shard_state:
        how = "data parallel, active block's optimizer state sharded (reduce-scatter, step a shard, all-gather)"
    else:
        how = "data parallel, active block's gradients all-reduced"
    steps = [p.step_seconds for p in pred.phases]
    busy = [p.net_seconds for p in pred.phases]
    c.print(f"cluster: {cl.nodes} node(s) x {cl.gpus_per_node} GPU(s) = {plan.world}; {'; '.join(links)}; {how}")
    c.print(f"per GPU: VRAM peak {_gib(pred.peak_vram_bytes)} GiB of {_gib(plan.budget_bytes)}; per node: host RAM "
            f"{_gib(pred.host_ram_bytes)} GiB of {plan.hardware.host.ram_gib:g}, NVMe {_gib(pred.nvme_bytes)} GiB; "
            f"on the wire {pred.wire_bytes_per_step / 1e9:,.2f} GB per GPU per step (mean over the cycle), the "
            f"network busy {sum(busy) / max(sum(steps), 1e-12):.0%} of the step")


def show_compare(plans: dict, console: Console | None = None) -> None:
    c = console or Console()
    t = Table(title="BCD against full-parameter training under the same budget", title_justify="left")
    for col in ("method", "peak VRAM GiB", "mean step s", "tokens/s", "cycle min", "host RAM GiB", "note"):
        t.add_column(col, justify="right")
    for m, p in plans.items():
        if isinstance(p, UserError):
            t.add_row(m, "-", "-", "-", "-", "-", "does not fit: " + str(p).split(".")[0])
            continue
        steps = [ph.step_seconds for ph in p.predicted.phases]
        t.add_row(m, _gib(p.predicted.peak_vram_bytes), f"{sum(steps) / len(steps):.2f}",
                  f"{p.predicted.tokens_per_s:,.0f}", f"{p.predicted.cycle_seconds / 60:.1f}",
                  _gib(p.predicted.host_ram_bytes),
                  "all layers every step" if m == "full" else f"{len(p.blocks)} blocks in turn")
    c.print(t)
