"""A fast stand-in for the ILP, for sweeps: a feasible plan in tens of milliseconds instead of seconds.

A sweep of 1,000 configurations on 2 cores has about 60 ms per configuration, and a CP-SAT solve takes 0.1 to
10 s, so the sweep cannot solve the ILP for each. This module searches a much smaller space by enumeration,
priced with exactly the ILP's own tables (planner.pricing: `layer_cost`, `step_cost`, `switch_cost`, the
gradient reductions) and checked with the ILP's memory accounting (`act_bytes`, `transient_bytes`, the
host-RAM rules) plus one thing the ILP leaves out and the simulator shows, activation offloads lagging a
forward pass (see `tables`):
  - 1 block for `full`, 1..n for `bcd`; one optimizer-state choice for all (gpu or cpu tier; on a cluster
    sharded over the ranks or not);
  - as many decoder layers' bf16 weights resident as memory allows, the top ones, and as many decoder layers
    keeping their activations on the device as memory allows, the top ones too; the other layers stream their
    weights from CPU and recompute (or offload) their activations. Top first for both because a layer in
    block b (0 = bottom) runs backward in b + 1 of the u phases: the top layers stream and recompute most
    often, so keeping theirs saves the most time; and in the bottom block's phase, where memory binds most,
    a layer above it holds only its frozen-size saved set, smaller than a trained layer's. Weights and
    activations compete for the same bytes, so both orders are priced: weights first (as many resident as fit,
    then as many kept activations as what is left allows) and activations first. The ILP mixes activation
    policies the same way (it keeps the top layers' activations and recomputes the rest when memory is short);
  - blocks cut bottom-heavy (`spans`: a bottom block of s layers, as many of s as fit above it, then single
    layers), for each block count at three bottom sizes: the largest that keeps the fit of ceil(n/u), and two
    larger ones, a quarter and three quarters of the way to the largest possible (when the first is within
    LADDER_REACH of the best plan so far). A larger bottom block means
    fewer phases that run backward through most of the model, paid for in memory (the ILP often puts two big
    blocks at the bottom and single layers above them, as the tokens objective favours);
  - embedding and head resident or streamed, the head's activations kept or recomputed; micro-batch among the
    divisors of each rank's batch.
Memory is checked by planner.fastfit (which phases can be the worst, in O(1) per fit): first on the bottom
block's phase alone, which depends only on that block's size (so one fit serves every block count), and in every
phase that can be the worst only for a candidate that may beat the best plan (an exact fit holds no more, so it
costs no less). The cycle is priced in closed form.

Clusters (Request.gpus / nodes, planner.cluster). Each rank is priced on its share of its node
(planner.cluster.rank_hardware, as the ILP does); a trained layer adds its gradient reduction beyond the backward
it overlaps and each phase the rest of its lowest layer's (pricing.exposed_reduce_seconds and
bottom_reduce_seconds, the ILP's and planning.predict's rule); the block's optimizer state is sharded over the
ranks or not (the request's choice, or both priced); host RAM is the node's: each rank's buffers times the
ranks, the frozen weights streamed from it held once (planner.memory.host_breakdown's rule). Full-parameter
training on several GPUs is FSDP, whose sharded weights and per-pass gathers this search does not model: it
returns None there, and callers plan those with planning.make_plan (simulator.sweep does).

It optimises what the ILP optimises (planning.score: tokens per second by default, or the cycle) and builds
its Plan with the planner's own assembly (planning.build_plan), keeping its own closed-form prediction. For the
cycle objective, at a fixed fit more blocks only add phases, so a larger block count is priced only when it fits
more; for tokens per second every block count is priced. No NVMe tier: a sweep that needs NVMe should use
`--exact` (the real planner). The plan it returns is then simulated by the engine like any other, so the sweep's
numbers are the simulator's; what it gives up is optimality (within 5% on the configurations tested in
tests/simulator/test_sweep.py and tests/planner/test_fastplan.py, where the ILP mixes placements within a block).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from planner import fastfit, memory
from planner.cluster import Cluster, rank_hardware
from planner.costs import LayerSizes, layer_sizes
from planner.errors import UserError
from planner.fastfit import Policy, overlap, segments, spans
from planner.hardware import GIB, Hardware
from planner.ilp import combos
from planner.memory import act_bytes, transient_bytes
from planner.plan import Block, PhasePrediction, Placement, Plan, Prediction, SolverReport, cycle_rate
from planner.planning import Request, accum, build_plan, candidates, cluster_of, score
from planner.pricing import (
    bottom_reduce_seconds,
    exposed_reduce_seconds,
    layer_cost,
    pass_costs,
    reduce_seconds,
    step_cost,
    switch_cost,
)
from planner.profile import ModelProfile

ACTS = ("gpu", "recompute", "cpu")
# a block count's larger bottom blocks are priced when its first is within this factor of the best plan so far:
# they gained up to 4% on the configurations of tests/simulator/test_sweep.py and tests/planner/test_fastplan.py
LADDER_REACH = 1.08


def _pl(i: int, weights: str, act: str, tier: str) -> Placement:
    return Placement(layer=i, weights=weights, activations=act, master=tier, moments=tier,
                     grads="gpu" if tier == "gpu" else "cpu")


@dataclass(frozen=True)
class _Tables:
    """Seconds per micro-batch of one layer of each kind, by (kind, weights, activations, role, state tier);
    per step, the optimizer step by (kind, weights, state) and a decoder layer's exposed reduction by
    (weights, activations, state), the lowest layer's by state; the switch by (kind, state); sizes, transients
    and device bytes. A state is (tier, sharded)."""
    sizes: tuple[LayerSizes, ...]
    world: int
    states: tuple[tuple[str, bool], ...]
    cost: dict
    step: dict
    switch: dict
    reduce: dict      # (weights, activations, state) -> a decoder layer's exposed reduction per step
    bottom: dict      # state -> the lowest trained layer's reduction nothing hides, per step of a phase
    transient: dict   # state tier -> the ILP's transient reserve
    state_bytes: dict  # state -> a trained decoder layer's device bytes of state and gradients
    act: dict         # (activation policy, role) -> a decoder layer's device bytes held for backward
    head_act: dict    # the same for the head
    backlog: float    # offloaded activations still on the device when a forward pass ends, per offloaded byte


def tables(prof: ModelProfile, hw: Hardware, mb: int, seq: int, switch_state: str, cluster: Cluster,
           shard: bool | None = None) -> _Tables:
    """`hw`: one rank's view of its node (rank_hardware). `shard`: the request's choice (None: both)."""
    sizes = tuple(layer_sizes(lp, mb, seq) for lp in prof.layers)
    world = cluster.world
    states = tuple((tier, s) for tier in ("gpu", "cpu")
                   for s in ((False,) if world <= 1 else (False, True) if shard is None else (bool(shard),)))
    cost, step, sw, red, bottom = {}, {}, {}, {}, {}
    for i, kind in ((0, "embedding"), (1, "decoder"), (len(sizes) - 1, "head")):
        sz = sizes[i]
        acts = ("gpu",) if kind == "embedding" else ACTS
        for w in ("gpu", "cpu"):
            for a in acts:
                for role in ("below", "above"):
                    cost[(kind, w, a, role, "gpu")] = layer_cost(sz, _pl(i, w, a, "gpu"), role, hw)
                for tier in ("gpu", "cpu"):
                    cost[(kind, w, a, "active", tier)] = layer_cost(sz, _pl(i, w, a, tier), "active", hw)
            for st in states:
                step[(kind, w, st)] = step_cost(sz, _pl(i, w, "gpu", st[0]), hw, shards=world if st[1] else 1,
                                                cluster=cluster)
        for st in states:
            sw[(kind, st)] = switch_cost(sz, st[0], switch_state, hw, shards=world if st[1] else 1)
    sd = sizes[1]
    for st in states:   # the ILP's reductions (pricing), on the decoder layers BCD trains; 0 on one GPU
        r = reduce_seconds(sd, st[1], cluster) if world > 1 else 0.0
        for w in ("gpu", "cpu"):
            for a in ACTS:
                red[(w, a, st)] = exposed_reduce_seconds(r, pass_costs(sd, _pl(1, w, a, st[0]), "active", hw)[1])
        b_min = min(pass_costs(sd, _pl(1, w, a, st[0]), "active", hw)[1]
                    for w, a in combos("decoder", memory.tiers(hw)))
        bottom[st] = bottom_reduce_seconds(r, b_min)
    roles = ("above", "active")
    # A forward pass runs ahead of its activation offloads when the device-to-host copy of a layer's saved
    # tensors takes longer than the layer's forward: after n layers, n * (1 - forward / offload) layers' worth
    # are still on the device. The ILP counts them as gone; the simulator's clock does not (resident weights:
    # the fastest forward, the largest backlog).
    fwd = cost[("decoder", "gpu", "gpu", "below", "gpu")]
    off = hw.link("d2h").io_seconds(sd.saved_bytes)
    return _Tables(backlog=max(0.0, 1.0 - fwd / off) if off > 0 else 0.0, sizes=sizes, world=world, states=states,
                   cost=cost, step=step, switch=sw, reduce=red, bottom=bottom,
                   transient={tier: transient_bytes(sizes, tier) for tier in ("gpu", "cpu")},
                   state_bytes={st: memory.trained_layer_device_bytes(sd.params, sd.param_bytes, st[0],
                                                                      world if st[1] else 1) for st in states},
                   act={(a, r): act_bytes(sd, a, r) for a in ACTS for r in roles},
                   head_act={(a, r): act_bytes(sizes[-1], a, r) for a in ACTS for r in roles})


def _price(t: _Tables, p: Policy, g: int) -> tuple[list[float], list[float]]:
    """Per phase: step seconds (g micro-batches of every layer by its role, then the block's optimizer step and
    the reductions no backward hides) and switch seconds."""
    c, st, s = t.cost, t.step, p.state
    n = len(t.sizes) - 2
    segs = segments(n, p.resident, p.keep, p.act)

    def dec(first: int, last: int, role: str, tr: str) -> float:
        return sum(overlap(first, last, a, b) * c[("decoder", w, ac, role, tr)] for a, b, w, ac in segs)
    full = p.method == "full"
    steps, switches = [], []
    for first, last in ([(1, n)] if full else spans(n, p.blocks, p.bottom)[0]):
        per_mb = (dec(1, first - 1, "below", "gpu") + dec(first, last, "active", s[0])
                  + dec(last + 1, n, "above", "gpu"))
        opt = t.bottom[s] + sum(overlap(first, last, a, b) * (st[("decoder", w, s)] + t.reduce[(w, ac, s)])
                                for a, b, w, ac in segs)
        if full:
            per_mb += (c[("embedding", p.emb_w, "gpu", "active", s[0])]
                       + c[("head", p.head_w, p.head_act, "active", s[0])])
            opt += st[("embedding", p.emb_w, s)] + st[("head", p.head_w, s)]
        else:
            per_mb += (c[("embedding", p.emb_w, "gpu", "below", "gpu")]
                       + c[("head", p.head_w, p.head_act, "above", "gpu")])
        steps.append(g * per_mb + opt)
        switches.append((last - first + 1) * t.switch[("decoder", s)] if p.blocks > 1 else 0.0)
    return steps, switches


def _cycle(t: _Tables, p: Policy, g: int, steps_per_block: int) -> float:
    """The cycle's seconds in closed form (what summing _price's phases gives): a decoder layer in block b is
    below the block being trained in u-1-b phases, above it in b, and trained in one."""
    c, st, s = t.cost, t.step, p.state
    n = len(t.sizes) - 2
    u = p.blocks
    full = p.method == "full"
    pre = spans(n, 1 if full else u, 0 if full else p.bottom)[2]
    per_mb, opt = 0.0, u * t.bottom[s]
    for first, last, w, ac in segments(n, p.resident, p.keep, p.act):
        cnt, sumb = last - first + 1, pre[last] - pre[first - 1]
        cb, ca = c[("decoder", w, ac, "below", "gpu")], c[("decoder", w, ac, "above", "gpu")]
        per_mb += cnt * ((u - 1) * cb + c[("decoder", w, ac, "active", s[0])]) + sumb * (ca - cb)
        opt += cnt * (st[("decoder", w, s)] + t.reduce[(w, ac, s)])
    if full:
        per_mb += (c[("embedding", p.emb_w, "gpu", "active", s[0])]
                   + c[("head", p.head_w, p.head_act, "active", s[0])])
        opt += st[("embedding", p.emb_w, s)] + st[("head", p.head_w, s)]
    else:
        per_mb += u * (c[("embedding", p.emb_w, "gpu", "below", "gpu")]
                       + c[("head", p.head_w, p.head_act, "above", "gpu")])
    switches = n * t.switch[("decoder", s)] if u > 1 else 0.0
    return steps_per_block * (g * per_mb + opt) + switches


def search(t: _Tables, req: Request, mb: int, cap: int, host_cap: int, best: tuple | None,
           acts: tuple[str, ...] = ACTS, blocks: int | None = None, ranks: int = 1) -> tuple | None:
    """The best (score, micro-batch, policy, window bytes, tables) at one micro-batch, improving on `best`; the
    score is planning.score's (the request's objective); `blocks` fixes BCD's block count; `ranks`: GPUs of a
    node (host RAM is the node's)."""
    n = len(t.sizes) - 2
    g = accum(req, mb)
    kk = req.steps_per_block
    tokens = req.objective == "tokens"
    # every phase runs at least a forward through every decoder layer: u phases cost at least u of those
    fwd = kk * g * n * min(c_ for key, c_ in t.cost.items() if key[0] == "decoder" and key[3] == "below")
    if req.method == "full":
        counts = [1]
    elif blocks:
        counts = [min(blocks, n)]
    elif tokens:  # every count: at the same fit, the block count still moves the time per phase
        counts = list(range(req.min_blocks or 1, min(n, req.max_blocks or n) + 1))
    else:  # the fewest blocks for each bottom-block size: memory depends on u only through that size
        counts, seen = [], set()
        for u in range(req.min_blocks or 1, min(n, req.max_blocks or n) + 1):
            if -(-n // u) not in seen:
                seen.add(-(-n // u))
                counts.append(u)
    # the activation policy of the layers that do not keep theirs ("gpu": all keep), and what memory serves
    # first: weights, activations, or ("none") weights alone when keeping activations is not allowed
    keeps = ("weights", "acts") if "gpu" in acts else ("none",)
    orders = [(a, "weights" if a == "gpu" else o) for a in acts for o in (keeps[:1] if a == "gpu" else keeps)]
    for state in t.states:
        for act, order in orders:
            for emb_w in ("gpu", "cpu"):
                for head_w in ("gpu", "cpu"):
                    for head_act in ("gpu", "recompute"):
                        prev, fits = None, {}
                        mk = dict(method=req.method, state=state, act=act, emb_w=emb_w, head_w=head_w,
                                  head_act=head_act)

                        def fit_of(bottom, u, mk=mk, fits=fits, order=order):
                            """The optimistic fit (the bottom phase's alone): it depends on the partition
                            only through the bottom block's size."""
                            if bottom not in fits:
                                p = Policy(blocks=u, resident=0, bottom=bottom, **mk)
                                fits[bottom] = fastfit.fit(t, p, cap, host_cap, req.switch_state, ranks, order, False)
                            return fits[bottom]
                        for u in counts:
                            if best is not None and (fwd if tokens else u * fwd) >= best[0]:
                                break
                            s0 = n if req.method == "full" else -(-n // u)
                            fit = fit_of(s0, u)
                            if fit is None or (not tokens and prev is not None and fit[0] <= prev[0]
                                               and fit[1] <= prev[1]):
                                continue  # cycle: at the same fit more blocks only add phases
                            prev = fit
                            # the largest bottom block that keeps this fit: fewer backward passes, free
                            lo, hi = s0, s0 if req.method == "full" else n - u + 1
                            hi_b = hi
                            while lo < hi:
                                mid = (lo + hi + 1) // 2
                                f = fit_of(mid, u)
                                lo, hi = (mid, hi) if f is not None and f[:2] == fit[:2] else (lo, mid - 1)
                            # and two larger ones: fewer deep phases, fewer kept layers (module docstring),
                            # when this count is within LADDER_REACH of the best so far
                            near = 0.0   # the first one's score
                            for bot in sorted({lo, lo + (hi_b - lo) // 4, lo + 3 * (hi_b - lo) // 4}):
                                f = fit_of(bot, u)
                                if f is None or (bot != lo and best is not None and near > best[0] * LADDER_REACH):
                                    break
                                p = Policy(blocks=u, resident=f[0], keep=f[1], bottom=0 if bot == s0 else bot, **mk)
                                sc = score(_cycle(t, p, g, kk) / kk, u, req.objective) * kk
                                # an exact fit holds no more, so it costs no less: checked only when it may win
                                exact = None if best is not None and sc >= best[0] else \
                                    fastfit.fit(t, p, cap, host_cap, req.switch_state, ranks, order)
                                if exact is not None and exact[:2] != (p.resident, p.keep):
                                    p = replace(p, resident=exact[0], keep=exact[1])
                                    sc = score(_cycle(t, p, g, kk) / kk, u, req.objective) * kk
                                if exact is not None and (best is None or sc < best[0]):
                                    best = (sc, mb, p, exact[2], t)
                                near = sc if bot == lo else near
                            if fit[0] == n and fit[1] == n and not tokens:
                                break
    return best


def quick_plan(prof: ModelProfile, hw: Hardware, req: Request, *, cap_bytes: int | None = None,
               cache: dict | None = None, acts: tuple[str, ...] = ACTS, blocks: int | None = None) -> Plan | None:
    """The fastest plan this search finds, as a Plan (solver status HEURISTIC), or None if nothing fits or the
    request is full-parameter training on several GPUs (FSDP: plan it with planning.make_plan). `hw`: one node
    (its GPU and its host), as make_plan takes it. `cache` keeps priced tables across calls (a sweep's worker
    passes one); `acts` limits the decoder layers' activation policies (a sweep drops offloading when the
    simulator finds offloads piling up on the device); `blocks` fixes the number of BCD blocks."""
    cache = {} if cache is None else cache
    cl = cluster_of(req, hw)
    if req.method == "full" and cl.world > 1:
        return None
    if req.batch % cl.world:
        raise UserError(f"--batch {req.batch} is the global batch and does not divide evenly over --gpus "
                        f"{cl.world}; give a multiple of {cl.world}.")
    budget = int((req.vram_gib if req.vram_gib is not None else hw.gpu.vram_gib) * GIB)
    reserve = int(req.reserve_gib * GIB)
    cap = cap_bytes if cap_bytes is not None else memory.device_cap_bytes(budget, reserve)
    host_cap = memory.host_usable_bytes(hw)
    if cap <= 0 or req.seq_len > prof.model.max_seq:
        return None
    rhw = rank_hardware(hw, cl)
    g_ = rhw.gpu
    best = None
    for mb in candidates(req):
        key = (prof.fingerprint, g_.id, g_.bf16_tflops, g_.memory_gbps, g_.h2d_gbps, g_.d2h_gbps, rhw.host, rhw.eff,
               mb, req.seq_len, req.switch_state, cl, req.shard_state)
        t = cache.get(key)
        if t is None:
            t = cache[key] = tables(prof, rhw, mb, req.seq_len, req.switch_state, cl, req.shard_state)
        best = search(t, req, mb, cap, host_cap, best, acts, blocks, cl.gpus_per_node)
    if best is None:
        return None
    _score, mb, p, win, t = best
    return _to_plan(prof, hw, req, budget, reserve, t, mb, p, win)


def _to_plan(prof, hw, req, budget, reserve, t: _Tables, mb, p: Policy, win: int) -> Plan:
    n = prof.n_decoder
    g = accum(req, mb)
    tokens_per_step = req.seq_len * req.batch   # the global batch
    steps, switches = _price(t, p, g)
    full = p.method == "full"
    blocks = ((Block(first=0, last=n + 1),) if full
              else tuple(Block(first=a, last=b) for a, b in spans(n, p.blocks, p.bottom)[0]))
    pls = ((_pl(0, p.emb_w, "gpu", p.state[0]),)
           + tuple(_pl(i, w, ac, p.state[0]) for a, b, w, ac in segments(n, p.resident, p.keep, p.act)
                   for i in range(a, b + 1))
           + (_pl(n + 1, p.head_w, p.head_act, p.state[0]),))
    phases = tuple(PhasePrediction(block=k, peak_vram_bytes=0, step_seconds=s, switch_seconds=w)
                   for k, (s, w) in enumerate(zip(steps, switches)))
    cycle, rate = cycle_rate(phases, steps_per_block=req.steps_per_block, tokens_per_step=tokens_per_step)
    pred = Prediction(phases=phases, host_ram_bytes=0, nvme_bytes=0, cycle_seconds=cycle, tokens_per_s=rate)
    # the objective in SolverReport's units: seconds per token, or cycle seconds per token of a step
    objective = 1 / rate if req.objective == "tokens" else cycle / tokens_per_step
    solver = SolverReport(status="HEURISTIC", objective_kind=req.objective, objective=objective, bound=0.0, gap=0.0,
                          solve_seconds=0.0, time_limit_s=0.0)
    return build_plan(prof, hw, req, budget, reserve, micro_batch=mb, blocks=blocks, placements=pls,
                      window_bytes=win, solver=solver, predicted=pred, shard_state=p.state[1])
