"""A fast stand-in for the ILP, for sweeps: a feasible plan in a few milliseconds instead of seconds.

A sweep of 1,000 configurations on 2 cores has about 60 ms per configuration, and a CP-SAT solve takes 0.1 to
10 s, so the sweep cannot solve the ILP for each. This module searches a much smaller space by enumeration,
priced with exactly the ILP's own tables (planner.pricing: `layer_cost`, `step_cost`, `switch_cost`, the
gradient reductions) and checked with the ILP's memory accounting (`act_bytes`, `transient_bytes`, the
host-RAM rules) plus one thing the ILP leaves out and the simulator shows, activation offloads lagging a
forward pass (see `tables`):
  - equal blocks (1 for `full`, 1..n for `bcd`), one optimizer-state choice for all (gpu or cpu tier; on a
    cluster sharded over the ranks or not);
  - as many decoder layers' bf16 weights resident as memory allows, the top ones, and as many decoder layers
    keeping their activations on the device as memory allows, the top ones too; the other layers stream their
    weights from CPU and recompute (or offload) their activations. Top first for both because a layer in
    block b (0 = bottom) runs backward in b + 1 of the u phases: the top layers stream and recompute most
    often, so keeping theirs saves the most time; and in the bottom block's phase, where memory binds most,
    a layer above it holds only its frozen-size saved set, smaller than a trained layer's. Weights and
    activations compete for the same bytes, so both orders are priced: weights first (as many resident as fit,
    then as many kept activations as what is left allows) and activations first. The ILP mixes activation
    policies the same way (it keeps the top layers' activations and recomputes the rest when memory is short);
  - blocks cut bottom-heavy (`_spans`: a bottom block of s layers, as many of s as fit above it, then single
    layers), for each block count at three bottom sizes: the largest that keeps the fit of ceil(n/u), and two
    larger ones, a quarter and three quarters of the way to the largest possible. A larger bottom block means
    fewer phases that run backward through most of the model, paid for in memory (the ILP often puts two big
    blocks at the bottom and single layers above them, as the tokens objective favours);
  - embedding and head resident or streamed, the head's activations kept or recomputed; micro-batch among the
    divisors of each rank's batch.
Memory is checked in the phases that can be the worst (`_phase_bytes`): the bottom block's (the largest, with
every other layer above it), the block holding the lowest kept-activation layer and the block above that (a
block whose layers all keep activations holds trainable-size saved sets, larger than the frozen-size ones the
bottom phase holds for them). Every other phase holds no more than one of these, so a fit costs O(1) and
depends on the block count only through the bottom block's size; the cycle is priced in closed form.

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

from bisect import bisect_right
from dataclasses import dataclass, replace

from planner import memory
from planner.cluster import Cluster, rank_hardware
from planner.costs import LayerSizes, layer_sizes
from planner.errors import UserError
from planner.hardware import GIB, Hardware
from planner.ilp import combos
from planner.memory import STATE_BYTES, Tier, act_bytes, shard_params, transient_bytes
from planner.plan import Block, PhasePrediction, Placement, Plan, Prediction, SolverReport, cycle_rate
from planner.planning import Request, accum, build_plan, candidates, cluster_of, score
from planner.pricing import (bottom_reduce_seconds, exposed_reduce_seconds, layer_cost, pass_costs,
                             reduce_seconds, step_cost, switch_cost)
from planner.profile import ModelProfile

ACTS = ("gpu", "recompute", "cpu")


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
    return _Tables(backlog=max(0.0, 1.0 - fwd / off) if off > 0 else 0.0, sizes=sizes, world=world, states=states, cost=cost,
                   step=step, switch=sw, reduce=red, bottom=bottom,
                   transient={tier: transient_bytes(sizes, tier) for tier in ("gpu", "cpu")},
                   state_bytes={st: memory.trained_layer_device_bytes(sd.params, sd.param_bytes, st[0],
                                                                      world if st[1] else 1) for st in states},
                   act={(a, r): act_bytes(sd, a, r) for a in ACTS for r in roles},
                   head_act={(a, r): act_bytes(sizes[-1], a, r) for a in ACTS for r in roles})


@dataclass(frozen=True)
class Policy:
    method: str
    blocks: int
    state: tuple[str, bool]   # optimizer state (and so gradients): (gpu | cpu, sharded over the ranks)
    act: str           # activations of the decoder layers that do not keep theirs on the device
    emb_w: str         # embedding weights: gpu | cpu
    head_w: str
    head_act: str
    resident: int      # decoder layers with resident weights (the top ones)
    keep: int = 0      # decoder layers keeping their activations on the device (the top ones)
    bottom: int = 0    # the bottom (largest) block's size; 0: ceil(n / blocks)


_SPANS: dict = {}


def _spans(n: int, u: int, bottom: int = 0) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Decoder layers 1..n cut into u contiguous blocks, bottom-heavy: from the bottom, each block takes
    `bottom` layers (default ceil(n/u)) while enough are left to give every block above one. The bottom block
    is the largest, so its phase holds the most trained state; a layer in a lower block runs backward in fewer
    phases, so of the cuts with that largest block this one has the fewest backward passes. Also the blocks'
    first layers (for bisection) and P[x], the sum of the block index (0 = bottom) of layers 1..x."""
    key = (n, u, bottom)
    if key not in _SPANS:
        s = bottom or -(-n // u)
        out, first, pre = [], 1, [0]
        for k in range(u):
            size = min(s, n - first + 1 - (u - 1 - k))
            out.append((first, first + size - 1))
            for _ in range(size):
                pre.append(pre[-1] + k)
            first += size
        _SPANS[key] = (out, [a for a, _ in out], pre)
    return _SPANS[key]


def _overlap(a: int, b: int, c: int, d: int) -> int:
    return max(0, min(b, d) - max(a, c) + 1)


def _segments(n: int, k: int, a: int, act: str) -> list[tuple[int, int, str, str]]:
    """(first, last, weights, activations) runs of decoder layers bottom-up: the top k resident, the top a
    keeping their activations on the device, the rest streamed and `act`."""
    lw, la = n - k + 1, n - a + 1
    lo, hi = min(lw, la), max(lw, la)
    mid = ("gpu", act) if lw < la else ("cpu", "gpu")
    return [seg for seg in ((1, lo - 1, "cpu", act), (lo, hi - 1) + mid, (hi, n, "gpu", "gpu")) if seg[1] >= seg[0]]


def _phase_bytes(t: _Tables, p: Policy, a: int, full: bool, every: bool = True) -> int:
    """The most device bytes of activations, trained state and offload backlog that a phase holds with the top
    `a` decoder layers keeping their activations (module docstring: which phases can be the worst); with
    `every` False, the bottom block's phase only (a lower bound that depends on the bottom block's size alone)."""
    n = len(t.sizes) - 2
    spans, firsts, _ = _spans(n, 1 if full else p.blocks, 0 if full else p.bottom)
    o, sb, ac = p.act, t.state_bytes[p.state], t.act
    js = {0}
    if a and every:
        j = bisect_right(firsts, n - a + 1) - 1   # the block holding the lowest kept layer
        js |= {j, min(j + 1, len(spans) - 1)}
    worst = 0
    for j in js:
        first, last = spans[j]
        g_in = _overlap(first, last, n - a + 1, n)
        o_in = last - first + 1 - g_in
        g_up = min(a, n - last)
        o_up = n - last - g_up
        b = (o_in * ac[(o, "active")] + g_in * ac[("gpu", "active")] + o_up * ac[(o, "above")]
             + g_up * ac[("gpu", "above")] + (last - first + 1) * sb)
        if o == "cpu":
            b += int(t.backlog * (o_in * t.sizes[1].saved_bytes + o_up * t.sizes[1].saved_frozen_bytes))
        worst = max(worst, b)
    return worst


def _fit(t: _Tables, p: Policy, cap: int, host_cap: int, switch_state: str, ranks: int,
         order: str, every: bool = True) -> tuple[int, int, int] | None:
    """(resident decoder layers, layers keeping activations, window bytes) that fit device and host memory,
    or None: the ILP's accounting and the offload lag. `order`: what memory serves first, "weights" or "acts"
    (module docstring); "none": no layer keeps activations but with p.act "gpu", where all do. `every`: as in
    _phase_bytes (False: an optimistic fit, on the bottom phase alone)."""
    sizes = t.sizes
    n = len(sizes) - 2
    sd, se, sh = sizes[1], sizes[0], sizes[-1]
    full = p.method == "full"
    tier, o = p.state[0], p.act
    base = t.head_act[(p.head_act, "active" if full else "above")] + t.transient[tier]
    if full:
        base += sum(memory.trained_layer_device_bytes(x.params, x.param_bytes, tier) for x in (se, sh))
    base += (se.param_bytes if p.emb_w == "gpu" else 0) + (sh.param_bytes if p.head_w == "gpu" else 0)
    edge = max(se.param_bytes if p.emb_w == "cpu" else 0, sh.param_bytes if p.head_w == "cpu" else 0)
    pb = sd.param_bytes
    win_some = 2 * max(edge, pb)

    def resident(a: int) -> tuple[int, int]:
        """(most resident layers, window bytes) with a layers keeping activations; (-1, 0) when none fit."""
        rest = cap - base - _phase_bytes(t, p, a, full, every)
        if n * pb + 2 * edge <= rest:
            return n, 2 * edge
        return min(n - 1, (rest - win_some) // pb), win_some

    def most_kept(k: int, win: int) -> int:
        """Most layers keeping activations with k resident (-1 when none fit): the bottom phase's bytes are
        linear in the count in two pieces (the layers above the bottom block, then those in it), which gives a
        first answer; a check of every phase that can be worse confirms it or bisects below it."""
        rest = cap - base - k * pb - win
        f0 = _phase_bytes(t, p, 0, full, every)
        if f0 > rest:
            return -1
        lag = t.backlog if o == "cpu" else 0.0
        d_up = t.act[("gpu", "above")] - t.act[(o, "above")] - lag * sd.saved_frozen_bytes
        d_in = t.act[("gpu", "active")] - t.act[(o, "active")] - lag * sd.saved_bytes
        s0 = n if full else _spans(n, p.blocks, p.bottom)[0][0][1]
        m = n - s0
        a = m if d_up <= 0 else min(m, int((rest - f0) // d_up))
        if a == m:
            a += s0 if d_in <= 0 else min(s0, int((rest - f0 - m * max(d_up, 0)) // d_in))
        if _phase_bytes(t, p, a, full, every) <= rest:
            return a
        lo, hi = 0, a - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _phase_bytes(t, p, mid, full, every) <= rest else (lo, mid - 1)
        return lo

    if o == "gpu":
        a = n
        k, win = resident(n)
    elif order != "acts":
        k, win = resident(0)
        a = (most_kept(k, win) if k >= 0 else -1) if order == "weights" else 0
    else:
        a = most_kept(0, win_some)
        k, win = resident(a) if a >= 0 else (-1, 0)
    if k < 0 or a < 0:
        return None
    # host RAM of one node (planner.memory.host_breakdown): streamed weights once, each rank's buffers
    shared = (n - k) * pb + (se.param_bytes if p.emb_w == "cpu" else 0) + (sh.param_bytes if p.head_w == "cpu" else 0)
    top = n if full else (p.bottom or -(-n // p.blocks))
    own = (((n - a) * sd.saved_bytes if o == "cpu" else 0) + (sh.saved_bytes if p.head_act == "cpu" else 0)
           + _host_trained(t, p.state, top, full, switch_state))
    return None if shared + ranks * own > host_cap else (k, a, win)


_HOST: dict = {}


def _host_trained(t: _Tables, state: tuple[str, bool], top: int, full: bool, switch_state: str) -> int:
    """One rank's host bytes for the trained layers (planner.memory's rules; no NVMe tier here): the largest
    block's `top` layers, the step's window and, with keep_cpu, every trained layer's kept state."""
    key = (id(t), state, top, full, switch_state)
    if key not in _HOST:
        if len(_HOST) > 100_000:
            _HOST.clear()
        sizes = t.sizes
        n, sd = len(sizes) - 2, sizes[1]
        shards = t.world if state[1] else 1
        edges = [sizes[0], sizes[-1]] if full else []

        def layer(x) -> int:
            return max(memory.trained_layer_host_bytes(x.params, x.param_bytes, state[0], w, shards)
                       for w in (Tier.GPU, Tier.CPU))
        out = top * layer(sd) + sum(layer(x) for x in edges)
        big = max([sd] + edges, key=lambda x: x.params)
        out += memory.step_host_bytes(big.params, big.param_bytes, state[0], nvme_weights=False, shards=shards)
        if switch_state == "keep_cpu":
            out += (n * shard_params(sd.params, shards) + sum(shard_params(x.params, shards) for x in edges)) \
                * STATE_BYTES
        _HOST[key] = (t, out)
    return _HOST[key][1]


def _price(t: _Tables, p: Policy, g: int) -> tuple[list[float], list[float]]:
    """Per phase: step seconds (g micro-batches of every layer by its role, then the block's optimizer step and
    the reductions no backward hides) and switch seconds."""
    c, st, s = t.cost, t.step, p.state
    n = len(t.sizes) - 2
    segs = _segments(n, p.resident, p.keep, p.act)

    def dec(first: int, last: int, role: str, tr: str) -> float:
        return sum(_overlap(first, last, a, b) * c[("decoder", w, ac, role, tr)] for a, b, w, ac in segs)
    full = p.method == "full"
    steps, switches = [], []
    for first, last in ([(1, n)] if full else _spans(n, p.blocks, p.bottom)[0]):
        per_mb = (dec(1, first - 1, "below", "gpu") + dec(first, last, "active", s[0])
                  + dec(last + 1, n, "above", "gpu"))
        opt = t.bottom[s] + sum(_overlap(first, last, a, b) * (st[("decoder", w, s)] + t.reduce[(w, ac, s)])
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
    pre = _spans(n, 1 if full else u, 0 if full else p.bottom)[2]
    per_mb, opt = 0.0, u * t.bottom[s]
    for first, last, w, ac in _segments(n, p.resident, p.keep, p.act):
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
                                fits[bottom] = _fit(t, p, cap, host_cap, req.switch_state, ranks, order, False)
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
                            # and two larger ones: fewer deep phases, fewer kept layers (module docstring)
                            for bot in sorted({lo, lo + (hi_b - lo) // 4, lo + 3 * (hi_b - lo) // 4}):
                                f = fit_of(bot, u)
                                if f is None:
                                    break
                                p = Policy(blocks=u, resident=f[0], keep=f[1], bottom=0 if bot == s0 else bot, **mk)
                                sc = score(_cycle(t, p, g, kk) / kk, u, req.objective) * kk
                                # an exact fit holds no more, so it costs no less: checked only when it may win
                                exact = None if best is not None and sc >= best[0] else \
                                    _fit(t, p, cap, host_cap, req.switch_state, ranks, order)
                                if exact is not None and exact[:2] != (p.resident, p.keep):
                                    p = replace(p, resident=exact[0], keep=exact[1])
                                    sc = score(_cycle(t, p, g, kk) / kk, u, req.objective) * kk
                                if exact is not None and (best is None or sc < best[0]):
                                    best = (sc, mb, p, exact[2], t)
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
              else tuple(Block(first=a, last=b) for a, b in _spans(n, p.blocks, p.bottom)[0]))
    pls = ((_pl(0, p.emb_w, "gpu", p.state[0]),)
           + tuple(_pl(i, w, ac, p.state[0]) for a, b, w, ac in _segments(n, p.resident, p.keep, p.act)
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
