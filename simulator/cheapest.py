"""The cheapest cluster that trains a model on a token budget before a deadline: catalog GPUs x GPU counts x
node layouts x method (BCD or full-parameter), each planned, simulated and priced.

Cost is what the GPUs are rented for: price per GPU-hour x GPUs x hours, hours = tokens / tokens per second
(simulator/cost.py); a configuration meets the deadline when those hours fit in it. Clusters scale weakly:
each GPU keeps `batch_per_gpu` sequences per optimizer step (simulator/sweep.py).

Keeping it fast (a search touches some 400 configurations; the ILP takes seconds a plan):
  - BCD is planned by the fast planner (planner.fastplan through simulator.sweep.fast_plan, under a second)
    once per GPU kind and number of GPUs a node g, for a node of g (each rank on its share of the node's host,
    the frozen weights held once, the gradient reductions priced: planner.fastplan), and that plan runs on every
    rank of every layout with g GPUs a node (`on_cluster`; weak scaling), checked against the node's host RAM
    (its ranks' buffers; the frozen weights they share, once). It does not shard optimizer state (a shard's
    bytes and step depend on the world it was planned for); `plan --gpus N` (the ILP) may do better.
    Full-parameter training on N GPUs is FSDP, which only the ILP's memory model knows, so it is planned by the
    ILP (one block: a fraction of a second) per GPU count, for the densest layout of that count, and re-timed
    on the sparser ones;
  - a BCD schedule without sharded state holds the same ops for every world size above one (each reduce
    carries the layer's whole gradient; only its price depends on the cluster), so it is built once per plan
    and only re-timed per layout (tests/simulator/test_cluster_sim.py checks the op lists are equal);
  - bounds rule out what cannot win, unsimulated and reported as such: N GPUs with g a node run one node's
    plan on every rank, and more nodes only add an inter-node level to each collective, so they train at most
    N/g times one node's simulated rate; full-parameter training at most the matmuls' peak (full_rate_bound).
    A layout whose bound misses the deadline is over it; a GPU kind and method whose best bound costs more than
    the best configuration found so far (taken cheapest bound first) is dearer. The tests check every bound
    against a brute-force search.
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from planner import memory
from planner.cluster import make_cluster
from planner.costs import layer_sizes
from planner.errors import UserError, closest
from planner.hardware import GIB, gpu_names, make_hardware
from planner.memory import window_layers
from planner.models import load_model_config
from planner.plan import METHODS, Plan
from planner.planning import Request
from planner.profile import profile_model
from simulator import sweep
from simulator.cost import hourly_price
from simulator.periodic import short_schedule, simulate_repeating

PER_NODE = (1, 2, 4, 8)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    gpu: str
    gpus: int
    nodes: int
    method: str
    fits: bool = True
    reason: str = ""                  # why it does not fit
    bound: str = ""                   # not simulated: ruled out by its group's rate bound ("deadline" or "cost");
                                      # seconds and usd are then the bound's (at least that long, that dear)
    tokens_per_s: float = 0.0         # simulated, all ranks; 0 when not simulated
    bound_tokens_per_s: float = 0.0   # the most tokens/s the bound allows, when it ruled the layout out
    seconds: float = math.inf         # to train the token budget
    usd: float = math.inf
    per_hour: float = 0.0             # dollars per GPU-hour
    blocks: int = 0
    meets: bool = False               # fits and trains the tokens before the deadline

    @property
    def layout(self) -> str:
        return f"{self.gpus} x {self.gpu}" + (f" ({self.nodes} nodes x {self.gpus // self.nodes})"
                                              if self.nodes > 1 else "")


@dataclass(frozen=True, kw_only=True)
class Result:
    model: str
    tokens: float
    deadline_seconds: float
    winner: Candidate | None
    candidates: tuple[Candidate, ...]   # every configuration, cheapest that meets the deadline first
    plans: int                          # planner calls
    simulated: int                      # configurations simulated
    wall_seconds: float
    skipped_gpus: tuple[str, ...] = ()  # catalog GPUs without a price


def counts(gpus_max: int) -> list[int]:
    """GPU counts searched: powers of two up to gpus_max."""
    out, n = [], 1
    while n <= gpus_max:
        out.append(n)
        n *= 2
    return out


def layouts(n: int, per_node_max: int = 8) -> list[tuple[int, int]]:
    """(GPUs, nodes) for n GPUs: every per-node count of PER_NODE up to per_node_max that divides n."""
    return [(n, n // k) for k in PER_NODE if k <= min(per_node_max, n) and n % k == 0]


def on_cluster(plan: Plan, gpus: int, nodes: int, interconnect: str | None = None) -> Plan:
    """`plan` with its per-rank shape and placements on another cluster: one rank's plan run by every rank of a
    larger cluster (weak scaling), or a plan re-laid over other nodes (its world size kept, and its sharding)."""
    cl = make_cluster(plan.hardware.gpu, gpus=gpus, nodes=nodes, interconnect_name=interconnect if nodes > 1 else None)
    shard = plan.shard_state and gpus == plan.world
    return dataclasses.replace(plan, cluster=cl, shard_state=shard, shape=dataclasses.replace(plan.shape, gpus=gpus))


def node_host_overflow(plan: Plan, prof) -> str:
    """Why a plan put on a cluster does not fit its nodes' host RAM ("" when it does): the planner's own count
    (planner.memory.host_bytes: per node, every rank's buffers and the frozen weights they share once)."""
    sizes = tuple(layer_sizes(lp, plan.shape.micro_batch, plan.shape.seq_len) for lp in prof.layers)
    need = memory.host_bytes(plan, sizes, window=window_layers(plan, sizes))
    have = memory.host_usable_bytes(plan.hardware)
    return "" if need <= have else (f"host RAM: a node needs {need / GIB:,.1f} GiB, "
                                    f"{have / GIB:,.1f} GiB usable")


def parse_deadline(s: str) -> float:
    """Seconds from '72h', '3d', '90min', '4500s' (a bare number is hours); UserError otherwise."""
    units = (("min", 60.0), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0), ("w", 604800.0))
    t = str(s).strip().lower()
    scale = 3600.0
    for u, f in units:
        if t.endswith(u):
            t, scale = t[: -len(u)].strip(), f
            break
    try:
        v = float(t)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0) or v * scale > 100 * 365 * 86400:
        raise UserError(f"--deadline must be a positive duration such as 72h, 3d, 90min or 4500s, not '{s}'.")
    return v * scale


def search(model: str, tokens: float, deadline_seconds: float, *, gpus: list[str] | None = None,
           gpus_max: int = 64, per_node_max: int = 8, methods: tuple[str, ...] = METHODS, seq_len: int = 2048,
           batch_per_gpu: int = 8, host_ram_gib: float | None = None, interconnect: str | None = None,
           workers: int = 1) -> Result:
    """Every configuration, evaluated; the winner is the cheapest that meets the deadline (ties: fewer GPUs).
    `workers` processes share the (GPU, method) pairs."""
    started = time.perf_counter()
    if not (isinstance(tokens, (int, float)) and math.isfinite(tokens) and 0 < tokens <= 1e16):
        raise UserError(f"--tokens must be a positive number of tokens up to 1e16, not {tokens!r}.")
    for flag, v, hi in (("--gpus-max", gpus_max, 1 << 14), ("--per-node", per_node_max, 8),
                        ("--batch", batch_per_gpu, 1 << 16), ("--seq", seq_len, 1 << 20)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise UserError(f"{flag} must be a whole number from 1 to {hi}, not {v!r}.")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method '{m}'; methods are {', '.join(METHODS)}{closest(m, METHODS)}.")
    known = gpu_names()
    for g in gpus or []:
        if g not in known:
            raise UserError(f"unknown GPU '{g}'. Known GPUs: {', '.join(known)}{closest(g, known)}.")
    if interconnect is not None:
        from planner.cluster import interconnect as link
        link(interconnect)
    cfg = load_model_config(model)
    prof = profile_model(cfg)
    seq = min(seq_len, cfg.max_seq)
    priced = [g for g in (gpus or known) if hourly_price(g).known]
    skipped = tuple(g for g in (gpus or known) if g not in priced)
    if not priced:
        raise UserError(f"no GPU among {', '.join(gpus or known)} has a price in the catalog; nothing to compare.")
    ctx = (cfg.name, host_ram_gib, tokens, deadline_seconds, seq, batch_per_gpu, gpus_max, per_node_max,
           interconnect)
    out: list[Candidate] = []
    stats = {"plans": 0, "simulated": 0}
    best = math.inf
    with _runner(workers, cfg.name, prof) as run:
        # a rate bound per GPU and method; groups taken cheapest bound first, skipped once dearer than the best
        bases = run(_base, [(ctx, g, m) for g in priced for m in methods])
        order = sorted(bases, key=lambda b: b["bound_usd"])
        while order:
            todo = []
            while order and len(todo) < max(1, workers):
                b = order.pop(0)
                if b["bound_usd"] > best * (1 + 1e-12):
                    out += _pruned(b, ctx)
                else:
                    todo.append(b)
            for cs, st in run(_group, [(ctx, b) for b in todo]):
                out += cs
                stats = {k: stats[k] + st[k] for k in stats}
                best = min([best] + [c.usd for c in cs if c.meets])
    stats["plans"] += sum(b["planned"] for b in bases)
    out.sort(key=rank)
    winner = out[0] if out and out[0].meets else None
    return Result(model=cfg.name, tokens=tokens, deadline_seconds=deadline_seconds, winner=winner,
                  candidates=tuple(out), plans=stats["plans"], simulated=stats["simulated"],
                  wall_seconds=time.perf_counter() - started, skipped_gpus=skipped)


def rank(c: Candidate) -> tuple:
    """Meeting the deadline first, then by cost and GPU count; the rest by time."""
    return (not c.meets, c.usd if c.meets else 0.0, c.seconds, c.gpus, c.nodes, c.gpu, c.method)


@contextmanager
def _runner(workers: int, name: str, prof):
    """run(fn, jobs) -> results, in this process or in `workers` processes holding the model's profile."""
    if workers <= 1:
        sweep._init_worker({name: prof})
        yield lambda fn, jobs: [fn(j) for j in jobs]
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=sweep._init_worker, initargs=({name: prof},)) as ex:
        yield lambda fn, jobs: list(ex.map(fn, jobs))


def full_rate_bound(prof, hw, seq: int) -> float:
    """Tokens/s one GPU can at most train full-parameter: each token's forward and trained backward matmuls
    through every layer at the GEMM efficiency's ceiling (Efficiency.matmul_max), at the micro-batch with the
    fewest FLOPs per token. The simulator charges every compute op at least its matmuls at that ceiling
    (Hardware.matmul_seconds), and a plan runs every one of them (recomputation and FSDP only add work), so
    N ranks train at most N times this."""
    per_token = min(sum(sz.fwd_flops + sz.bwd_flops for sz in (layer_sizes(lp, mb, seq) for lp in prof.layers))
                    / (mb * seq) for mb in (1, 2, 4, 8, 16, 32))
    return hw.gpu.bf16_tflops * 1e12 * hw.eff.matmul_max / per_token


def _base(job) -> dict:
    """A GPU kind and method's bound on tokens/s per GPU, by GPUs a node (`per_gpu`), and the cheapest cost it
    allows whatever the count (`bound_usd`). BCD: the fast plan of one rank of a node of g GPUs, simulated on
    that node (`plans`); every layout with g GPUs a node runs it on every rank, and more nodes only add an
    inter-node level to each collective, so N GPUs run at most N/g times that node's rate. Full: the matmul
    bound (full_rate_bound)."""
    (name, host_ram_gib, tokens, deadline, seq, batch, gpus_max, per_node_max, _), g, method = job
    prof = sweep._PROFILES[name]
    hw = make_hardware(gpu=g, host_ram_gib=host_ram_gib)
    base = {"gpu": g, "method": method, "plans": {}, "per_gpu": {}, "planned": 0}
    per_node = [k for k in PER_NODE if k <= min(per_node_max, gpus_max)]
    if method == "bcd":
        for k in per_node:
            plan, why = sweep.fast_plan(prof, hw, _request(hw, method, seq, batch, k, 1, None))
            rate = sweep.outcome_of(prof, hw, plan).tokens_per_s if plan is not None else 0.0
            base["plans"][k] = (plan, why)
            base["per_gpu"][k] = rate / k
            base["planned"] += 1
    else:
        base["per_gpu"] = dict.fromkeys(per_node, full_rate_bound(prof, hw, seq))
    best = max(base["per_gpu"].values(), default=0.0)
    base["bound_usd"] = _usd(hourly_price(g).per_hour, 1, tokens / best) if best > 0 else 0.0
    return base


def _pruned(b: dict, ctx) -> list[Candidate]:
    """Every layout of a group its bound already rules out: dearer than the best found, or over the deadline."""
    _, _, tokens, deadline, _, _, gpus_max, per_node_max, _ = ctx
    out = []
    for n in counts(gpus_max):
        for gpus, nodes in layouts(n, per_node_max):
            rate = gpus * b["per_gpu"][gpus // nodes]
            secs = tokens / rate if rate > 0 else math.inf
            out.append(Candidate(gpu=b["gpu"], gpus=gpus, nodes=nodes, method=b["method"],
                                 bound="deadline" if secs > deadline else "cost",
                                 per_hour=hourly_price(b["gpu"]).per_hour, bound_tokens_per_s=rate, seconds=secs,
                                 usd=_usd(hourly_price(b["gpu"]).per_hour, gpus, secs)))
    return out


def _group(job) -> tuple[list[Candidate], dict]:
    """Every layout of one GPU kind and method, in a worker. BCD runs the base's plan for its GPUs a node on
    every rank; full-parameter training is planned once per GPU count, for its densest layout (the most GPUs a
    node share a node's host), and re-timed on the other layouts. A schedule is built once per plan and world
    size (BCD without sharded state: once for every world above one)."""
    (name, host_ram_gib, tokens, deadline, seq, batch, gpus_max, per_node_max, interconnect), b = job
    prof = sweep._PROFILES[name]
    g, method = b["gpu"], b["method"]
    hw = make_hardware(gpu=g, host_ram_gib=host_ram_gib)
    per_hour = hourly_price(g).per_hour
    stats = {"plans": 0, "simulated": 0}
    out = []
    plans = dict(b["plans"])        # BCD: by GPUs a node; full: by GPU count
    scheds: dict = {}
    for n in counts(gpus_max):
        for gpus, nodes in layouts(n, per_node_max):
            c = Candidate(gpu=g, gpus=gpus, nodes=nodes, method=method, per_hour=per_hour)
            planned_at = gpus // nodes if method == "bcd" else gpus
            if planned_at not in plans:
                stats["plans"] += 1
                req = _request(hw, method, seq, batch, gpus, gpus // min(per_node_max, gpus), interconnect)
                plans[gpus] = (sweep.exact_plan if sweep.uses_ilp(method, gpus) else sweep.fast_plan)(prof, hw, req)
            plan, why = plans[planned_at]
            if plan is None:
                out.append(dataclasses.replace(c, fits=False, reason=why))
                continue
            bound = gpus * b["per_gpu"][gpus // nodes]
            if method == "bcd" and tokens / bound > deadline:
                secs = tokens / bound
                out.append(dataclasses.replace(c, bound="deadline", bound_tokens_per_s=bound, seconds=secs,
                                               usd=_usd(per_hour, gpus, secs)))
                continue
            plan = on_cluster(plan, gpus, nodes, interconnect)
            over = node_host_overflow(plan, prof)
            if over:
                out.append(dataclasses.replace(c, fits=False, reason=over))
                continue
            key = (planned_at, gpus > 1) if method == "bcd" and not plan.shard_state else (planned_at, gpus)
            if key not in scheds:
                scheds[key] = short_schedule(plan, prof)
            stats["simulated"] += 1
            rate = simulate_repeating(plan, hw, profile=prof, schedule=scheds[key]).tokens_per_s
            secs = tokens / rate if rate > 0 else math.inf
            out.append(dataclasses.replace(c, tokens_per_s=rate, seconds=secs, usd=_usd(per_hour, gpus, secs),
                                           blocks=len(plan.blocks), meets=secs <= deadline))
    return out, stats


def _usd(per_hour: float, gpus: int, seconds: float) -> float:
    return per_hour * gpus * seconds / 3600.0


def _request(hw, method, seq, batch, gpus, nodes, interconnect) -> Request:
    """BCD's rank plan runs on other world sizes (on_cluster), so its state is not sharded: a shard's bytes and
    step depend on the world it was planned for."""
    return Request(method=method, vram_gib=hw.gpu.vram_gib, seq_len=seq, batch=sweep.request_batch(batch, gpus),
                   time_limit_s=5.0, gpus=gpus, nodes=nodes, interconnect=interconnect if nodes > 1 else None,
                   shard_state=False if method == "bcd" and gpus > 1 else None)
