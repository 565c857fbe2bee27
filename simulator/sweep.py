"""Sweeps: a grid of models x GPUs x VRAM budgets (x methods) (x GPU counts x nodes), each configuration
planned and simulated.

Clusters scale weakly: `batch` is the sequences per optimizer step of each GPU, so a cluster of N trains N x
batch sequences per step (the global batch the planner's Request takes) and every rank keeps the one-GPU
shape. A configuration's per-GPU tokens/s over the one-GPU figure at the same shape is then its scaling
efficiency: what the exposed communication costs (simulator/network.py); cost counts every GPU's hours.

What one configuration costs decides how a sweep works. A CP-SAT solve takes 0.1 to 10 s, and 1,000
configurations must finish in 30 s on 2 cores (60 ms each), so by default a configuration is planned by
`planner.fastplan.quick_plan` (an enumeration of simple policies, the top layers' weights resident and their
activations kept as memory allows, priced with the ILP's own tables, tens of ms) and that plan is then simulated
by the engine like any other. Building the planner's schedule is most of what remains (a 7B step of 8
micro-batches is ~5,000 ops), so `simulator.periodic` plays three micro-batches and extends the exactly repeating
pattern to the step's g (same numbers, checked op by op). A simulated peak above
the budget tightens the cap and plans again, as the planner does.
`exact=True` runs the real planner (planner.planning.make_plan) instead: optimal plans, seconds each; so
does full-parameter training on several GPUs (FSDP: `uses_ilp`).

Work is spread over processes (concurrent.futures.ProcessPoolExecutor) in chunks of configurations that share
a model and a GPU, so a worker's caches hit: profiles are measured once in the parent (and cached on disk by
planner.profile) and handed to the workers; priced tables are kept per (model, GPU, micro-batch) and
simulations per distinct plan.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from planner import memory
from planner.errors import UserError, closest
from planner.fastplan import ACTS, quick_plan
from planner.hardware import GIB, Hardware, gpu_names, make_hardware
from planner.models import load_model_config
from planner.plan import METHODS, write_atomic
from planner.planning import Request, make_plan
from planner.profile import ModelProfile, profile_model
from simulator.cost import hourly_price, usd_per_billion_tokens
from simulator.engine import STREAM_WORDS
from simulator.periodic import simulate_repeating


@dataclass(frozen=True, kw_only=True)
class Config:
    model: str
    gpu: str
    vram_gib: float | None      # the budget; None: the card's VRAM
    method: str = "bcd"
    seq_len: int = 2048
    batch: int = 8
    host_ram_gib: float | None = None
    cpu_adam_params_per_s: float | None = None
    blocks: int | None = None   # BCD's block count fixed (default: the planner's choice)
    exact: bool = False
    gpus: int = 1               # GPUs in all, data parallel (planner.cluster)
    nodes: int = 1
    interconnect: str | None = None   # between nodes (planner.cluster.INTERCONNECTS); None: the planner's default


@dataclass(frozen=True, kw_only=True)
class Row:
    model: str
    gpu: str
    vram_gib: float
    method: str
    fits: bool
    reason: str = ""              # why not, when it does not fit
    micro_batch: int = 0
    blocks: int = 0
    streamed_layers: int = 0      # layers whose weights stream from CPU
    state_tier: str = ""
    step_seconds: float = 0.0     # mean over phases
    tokens_per_s: float = 0.0     # over a whole cycle
    peak_gib: float = 0.0
    bottleneck: str = ""          # of the slowest phase
    limited_by: str = ""          # the resource holding most of the slowest phase's critical path
    price_per_hour: float | None = None
    usd_per_btok: float | None = None
    price_note: str = ""
    planner: str = "fast"         # fast | ilp
    gpus: int = 1
    nodes: int = 1
    tokens_per_s_per_gpu: float = 0.0
    scaling_efficiency: float | None = None   # per-GPU tokens/s over the one-GPU figure at the same shape
    wire_bytes_per_step: float = 0.0          # bytes one rank sends per optimizer step (mean over the cycle)
    shard_state: bool = False


def request_batch(batch_per_gpu: int, world: int) -> int:
    """The planner's Request.batch for a cluster: the global batch, sequences per step over all ranks."""
    return batch_per_gpu * world


def layouts(counts: list[int], nodes: list[int]) -> list[tuple[int, int]]:
    """(GPUs in all, nodes) pairs that split evenly, in the order given; a count below the nodes is skipped."""
    for v in counts + nodes:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 16:
            raise UserError(f"--gpus and --nodes take positive whole numbers, got {v!r}.")
    out = [(g, n) for g in counts for n in nodes if g % n == 0]
    if not out:
        raise UserError(f"no GPU count in --gpus {','.join(map(str, counts))} splits evenly over the nodes in "
                        f"--nodes {','.join(map(str, nodes))}; give counts that are multiples of the node counts.")
    return out


def grid(models: list[str], gpus: list[str], vrams: list[float | None], methods: list[str], *, seq_len: int = 2048,
         batch: int = 8, host_ram_gib: float | None = None, cpu_adam_params_per_s: float | None = None,
         blocks: int | None = None, exact: bool = False, counts: list[int] | None = None,
         nodes: list[int] | None = None, interconnect: str | None = None) -> list[Config]:
    """Every combination, validated at the edge: unknown names raise UserError with a did-you-mean.
    `counts` x `nodes`: cluster layouts (GPUs in all, nodes; pairs that do not split evenly are left out)."""
    known_gpus = gpu_names()
    for g in gpus:
        if g not in known_gpus:
            raise UserError(f"unknown GPU '{g}' in the sweep. Known GPUs: {', '.join(known_gpus)}"
                            f"{closest(g, known_gpus)}.")
    for m in models:
        load_model_config(m)  # raises UserError for an unknown name or a bad config path
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method '{m}'; methods are {', '.join(METHODS)}{closest(m, METHODS)}.")
    for v in vrams:
        if v is not None and not 0 < v <= 4096:
            raise UserError(f"--vram values must be budgets in GiB between 0 and 4096, got {v!r}.")
    if seq_len <= 0 or batch <= 0:
        raise UserError("--seq and --batch must be positive integers.")
    if blocks is not None and (blocks <= 0 or exact):
        raise UserError("--blocks must be a positive number of blocks, and works with the fast planner only "
                        "(the ILP chooses its own block count; --exact cannot fix it).")
    lay = layouts(counts or [1], nodes or [1])
    if interconnect is not None:
        from planner.cluster import interconnect as link
        link(interconnect)  # an unknown name: UserError with the known ones
    return [Config(model=m, gpu=g, vram_gib=v, method=me, seq_len=seq_len, batch=batch, host_ram_gib=host_ram_gib,
                   cpu_adam_params_per_s=cpu_adam_params_per_s, blocks=blocks, exact=exact, gpus=n, nodes=k,
                   interconnect=interconnect)
            for m in models for g in gpus for me in methods for v in vrams for n, k in lay]


# Per-process state of a worker: profiles handed over by the parent, and caches.
_PROFILES: dict[str, ModelProfile] = {}
_TABLES: dict = {}
_SIMS: dict = {}
_HW: dict = {}


def _init_worker(profiles: dict[str, ModelProfile]) -> None:
    _PROFILES.update(profiles)


def _hardware(c: Config) -> Hardware:
    key = (c.gpu, c.host_ram_gib, c.cpu_adam_params_per_s)
    if key not in _HW:
        _HW[key] = make_hardware(gpu=c.gpu, host_ram_gib=c.host_ram_gib, cpu_adam_params_per_s=c.cpu_adam_params_per_s)
    return _HW[key]


def evaluate(c: Config) -> Row:
    """Plan and simulate one configuration."""
    hw = _hardware(c)
    vram = hw.gpu.vram_gib if c.vram_gib is None else c.vram_gib
    price = hourly_price(c.gpu)
    exact = c.exact or uses_ilp(c.method, c.gpus)
    row = dict(model=c.model, gpu=c.gpu, vram_gib=vram, method=c.method, price_per_hour=price.per_hour,
               price_note=price.note, planner="ilp" if exact else "fast", gpus=c.gpus, nodes=c.nodes)
    if vram > hw.gpu.vram_gib + 1e-9:
        return Row(fits=False, reason=f"budget above the card's {hw.gpu.vram_gib:g} GiB", **row)
    prof = _PROFILES.get(c.model) or profile_model(load_model_config(c.model))
    req = Request(method=c.method, vram_gib=vram, seq_len=min(c.seq_len, prof.model.max_seq),
                  batch=request_batch(c.batch, c.gpus), time_limit_s=5.0, gpus=c.gpus, nodes=c.nodes,
                  interconnect=c.interconnect if c.nodes > 1 else None)
    if req.reserve_gib * GIB >= vram * GIB:
        return Row(fits=False, reason="budget below the reserve", **row)
    out, why = _exact(prof, hw, req) if exact else _fast(prof, hw, req, c.blocks)
    if out is None:
        return Row(fits=False, reason=why, **row)
    return Row(fits=True, micro_batch=out.micro_batch, blocks=out.plan_blocks, streamed_layers=out.streamed,
               state_tier=out.state_tier, step_seconds=out.step_seconds, tokens_per_s=out.tokens_per_s,
               peak_gib=out.peak_bytes / GIB, bottleneck=out.bottleneck, limited_by=out.limited_by,
               usd_per_btok=usd_per_billion_tokens(out.tokens_per_s, price.per_hour, c.gpus),
               tokens_per_s_per_gpu=out.tokens_per_s / c.gpus, wire_bytes_per_step=out.wire_bytes,
               shard_state=out.shard_state, **row)


@dataclass(frozen=True)
class _Outcome:
    """What a row needs from a simulation; cached per distinct plan instead of the whole Simulation."""
    plan_blocks: int
    micro_batch: int
    streamed: int
    state_tier: str
    step_seconds: float
    tokens_per_s: float
    peak_bytes: int
    bottleneck: str
    limited_by: str
    wire_bytes: float = 0.0
    shard_state: bool = False


def _outcome(sim) -> _Outcome:
    plan = sim.plan
    slowest = max(sim.phases, key=lambda p: p.step_seconds)
    return _Outcome(plan_blocks=len(plan.blocks), micro_batch=plan.shape.micro_batch,
                    streamed=sum(1 for p in plan.placements if p.weights != "gpu"),
                    state_tier=plan.placement(plan.blocks[0].first).master,
                    step_seconds=sum(p.step_seconds for p in sim.phases) / len(sim.phases),
                    tokens_per_s=sim.tokens_per_s, peak_bytes=sim.peak_bytes, bottleneck=slowest.bottleneck,
                    limited_by=STREAM_WORDS[max(slowest.critical_seconds, key=slowest.critical_seconds.get)],
                    wire_bytes=sim.wire_bytes_per_step, shard_state=plan.shard_state)


def _fast(prof: ModelProfile, hw: Hardware, req: Request, blocks: int | None = None):
    """(outcome, "") of the fast plan, simulated, or (None, why not)."""
    plan, why = fast_plan(prof, hw, req, blocks)
    return (None, why) if plan is None else (_SIMS[_sim_key(prof, hw, plan)], "")


def outcome_of(prof: ModelProfile, hw: Hardware, plan) -> "_Outcome":
    """The cached simulation outcome of a plan fast_plan returned."""
    return _SIMS[_sim_key(prof, hw, plan)]


def _sim_key(prof: ModelProfile, hw: Hardware, plan) -> tuple:
    return (prof.fingerprint, hw.gpu.id, hw.host, plan.shape, plan.blocks, plan.placements,
            plan.prefetch_window_bytes, plan.cluster, plan.shard_state)


def fast_plan(prof: ModelProfile, hw: Hardware, req: Request, blocks: int | None = None):
    """(plan, "") from quick_plan whose simulation fits, or (None, why not). On a simulated overflow it
    tightens the cap and plans again (as make_plan does); simulations are cached per distinct plan.

    The ILP's accounting (which quick_plan shares) counts offloaded activations as gone once their layer's
    forward ends; on the simulated clock they stay until the device-to-host copy finishes, and when the link
    is slower than the forward they pile up. So after a first overflow the search also drops offloading.

    On a cluster the fast planner prices what the ILP prices (planner.fastplan: a rank's share of its node, the
    gradient reductions, sharded state, the node's host RAM with the streamed weights held once); it takes the
    node's hardware, as make_plan does."""
    budget = int(req.vram_gib * GIB)
    cap = memory.device_cap_bytes(budget, int(req.reserve_gib * GIB))
    acts = ACTS
    for _attempt in range(5):
        plan = quick_plan(prof, hw, req, cap_bytes=cap, cache=_TABLES, acts=acts, blocks=blocks)
        if plan is None:
            return None, "nothing fits: not even with every layer streamed and activations recomputed"
        key = _sim_key(prof, hw, plan)
        out = _SIMS.get(key)
        if out is None:
            out = _SIMS[key] = _outcome(simulate_repeating(plan, hw, profile=prof))
        over = out.peak_bytes - memory.plan_cap_bytes(plan)
        if over <= 0:
            return plan, ""
        if acts == ACTS and any(p.activations == "cpu" for p in plan.placements):
            acts = ("gpu", "recompute")
            continue
        cap -= over + (1 << 20)
        if cap <= 0:
            break
    return None, "the simulated peak stays above the budget"


def uses_ilp(method: str, gpus: int) -> bool:
    """Full-parameter training on several GPUs is planned by the ILP even in a fast sweep: it is FSDP, whose
    sharded weights, gradients and state only the ILP's memory model knows (the fast planner would price every
    rank holding all of them); with one block its solve takes a fraction of a second."""
    return method == "full" and gpus > 1


def _exact(prof: ModelProfile, hw: Hardware, req: Request):
    plan, why = exact_plan(prof, hw, req)
    return (None, why) if plan is None else (outcome_of(prof, hw, plan), "")


def exact_plan(prof: ModelProfile, hw: Hardware, req: Request):
    """(plan, "") from the ILP (planner.planning.make_plan), simulated and cached, or (None, why not)."""
    try:
        plan = make_plan(prof.model, hw, req, prof)
    except UserError as e:
        return None, str(e).split(". ")[0]
    key = _sim_key(prof, hw, plan)
    if key not in _SIMS:
        _SIMS[key] = _outcome(simulate_repeating(plan, hw, profile=prof))
    return plan, ""


def _run_chunk(chunk: list[Config]) -> list[Row]:
    return [evaluate(c) for c in chunk]


def run(configs: list[Config], *, workers: int = 2, chunk: int = 25) -> list[Row]:
    """Evaluate every configuration, in `workers` processes (1: in this process). Rows keep the grid's order.
    Cluster rows get their scaling efficiency from the one-GPU configuration of the same shape (evaluated too
    when the grid lacks it, not returned)."""
    base = {dataclasses.replace(c, gpus=1, nodes=1, interconnect=None) for c in configs if c.gpus > 1}
    extra = sorted(base - set(configs), key=lambda c: (c.model, c.gpu, c.method, str(c.vram_gib)))
    rows = _run(configs + extra, workers=workers, chunk=chunk)
    ones = {(c.model, c.gpu, c.vram_gib, c.method): r for c, r in zip(configs + extra, rows) if c.gpus == 1}
    out = []
    for c, r in zip(configs, rows):
        one = ones.get((c.model, c.gpu, c.vram_gib, c.method))
        if r.fits and one is not None and one.fits and one.tokens_per_s > 0:
            r = dataclasses.replace(r, scaling_efficiency=r.tokens_per_s_per_gpu / one.tokens_per_s)
        out.append(r)
    return out


def _run(configs: list[Config], *, workers: int, chunk: int) -> list[Row]:
    profiles = {}
    for name in dict.fromkeys(c.model for c in configs):
        profiles[name] = profile_model(load_model_config(name))
    # chunks share a model and a GPU so a worker's caches hit
    order = sorted(range(len(configs)), key=lambda i: (configs[i].model, configs[i].gpu, configs[i].method,
                                                       configs[i].gpus))
    chunks = [order[k:k + chunk] for k in range(0, len(order), chunk)]
    rows: list[Row | None] = [None] * len(configs)
    if workers <= 1 or len(chunks) == 1:
        _init_worker(profiles)
        for ids in chunks:
            for i, r in zip(ids, _run_chunk([configs[i] for i in ids])):
                rows[i] = r
        return rows
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(profiles,)) as ex:
        for ids, result in zip(chunks, ex.map(_run_chunk, [[configs[i] for i in ids] for ids in chunks])):
            for i, r in zip(ids, result):
                rows[i] = r
    return rows


FIELDS = [f for f in Row.__dataclass_fields__]


def to_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return out.getvalue()


def write_csv(path: str, rows: list[Row]) -> None:
    write_atomic(path, to_csv(rows))


def plot(path: str, rows: list[Row]) -> None:
    """Tokens/s against the VRAM budget, one line per (model, GPU, method)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UserError(f"cannot write '{path}': directory '{d}' does not exist or is not writable.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict[tuple, list[Row]] = {}
    for r in rows:
        lines.setdefault((r.model, r.gpu, r.method, r.gpus, r.nodes), []).append(r)
    for (m, g, me, n, k), rs in lines.items():
        pts = sorted((r.vram_gib, r.tokens_per_s) for r in rs if r.fits)
        if pts:
            where = "" if n == 1 else f" x{n}" + (f"/{k} nodes" if k > 1 else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"{m} {g}{where} {me}")
    ax.set_xlabel("VRAM budget (GiB)")
    ax.set_ylabel("tokens/s (simulated, whole BCD cycle)")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    from simulator.report import save_figure
    save_figure(fig, path)

