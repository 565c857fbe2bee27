"""A fast stand-in for the ILP, for sweeps: a feasible plan in a few milliseconds instead of seconds.

A sweep of 1,000 configurations on 2 cores has about 60 ms per configuration, and a CP-SAT solve takes 0.1 to
10 s, so the sweep cannot solve the ILP for each. This module searches a much smaller space by enumeration,
priced with exactly the ILP's own tables (`planner.ilp.layer_cost`, `step_cost`, `switch_cost`) and checked
with the ILP's memory accounting (`act_bytes`, `transient_bytes`, the host-RAM rule) plus one thing the ILP
leaves out and the simulator shows, activation offloads lagging a forward pass (see `tables`):
  - equal blocks (1 for `full`, 1..n for `bcd`), one optimizer-state tier for all (gpu or cpu);
  - one activation policy for every decoder layer (gpu, recompute or cpu);
  - as many decoder layers' bf16 weights resident as memory allows, the top ones first (they run backward in
    the most phases, so streaming them costs most); the rest stream from CPU; embedding and head resident or
    streamed, the head's activations kept or recomputed; micro-batch among the divisors of the batch.
It optimises what the ILP optimises (planning.score: tokens per second by default, or the cycle) and builds
its Plan with the planner's own assembly (planning.build_plan), keeping its own closed-form prediction. Two
facts keep it fast: the worst phase for memory is always the bottom block's (it is the largest and has every
other layer above it), so a policy's fit is O(1) and depends on the block count only through that block's size
(one fit per size); and the cycle is priced in closed form. For the cycle objective, at a fixed number of
resident layers more blocks only add phases, so a larger block count is priced only when it lets more layers
stay resident; for tokens per second every block count is priced. No NVMe tier: a sweep that
needs NVMe should use `--exact` (the real planner). The plan it returns is then simulated by the engine like
any other, so the sweep's numbers are the simulator's; what it gives up is optimality (a few percent on the
configurations tested in tests/simulator/test_sweep.py, where the ILP mixes placements within a block).
"""
from __future__ import annotations

from dataclasses import dataclass

from planner import memory
from planner.costs import LayerSizes, layer_sizes
from planner.hardware import GIB, Hardware
from planner.ilp import layer_cost, step_cost, switch_cost
from planner.memory import STATE_BYTES, Tier, act_bytes, transient_bytes
from planner.plan import Block, PhasePrediction, Placement, Plan, Prediction, SolverReport, cycle_rate
from planner.planning import Request, accum, build_plan, candidates, score
from planner.profile import ModelProfile

ACTS = ("gpu", "recompute", "cpu")


def _pl(i: int, weights: str, act: str, tier: str) -> Placement:
    return Placement(layer=i, weights=weights, activations=act, master=tier, moments=tier,
                     grads="gpu" if tier == "gpu" else "cpu")


@dataclass(frozen=True)
class _Tables:
    """Seconds per micro-batch of one layer of each kind, by (kind, weights, activations, role, state tier);
    the optimizer step by (kind, weights, tier) and the switch by (kind, tier); sizes and transients."""
    sizes: tuple[LayerSizes, ...]
    cost: dict
    step: dict
    switch: dict
    transient: dict   # state tier -> the ILP's transient reserve
    act: dict         # (activation policy, role) -> a decoder layer's device bytes held for backward
    head_act: dict    # the same for the head
    backlog: float    # offloaded activations still on the device when a forward pass ends, per offloaded byte


def tables(prof: ModelProfile, hw: Hardware, mb: int, seq: int, switch_state: str) -> _Tables:
    sizes = tuple(layer_sizes(lp, mb, seq) for lp in prof.layers)
    cost, step, sw = {}, {}, {}
    for i, kind in ((0, "embedding"), (1, "decoder"), (len(sizes) - 1, "head")):
        sz = sizes[i]
        acts = ("gpu",) if kind == "embedding" else ACTS
        for w in ("gpu", "cpu"):
            for a in acts:
                for role in ("below", "above"):
                    cost[(kind, w, a, role, "gpu")] = layer_cost(sz, _pl(i, w, a, "gpu"), role, hw)
                for tier in ("gpu", "cpu"):
                    cost[(kind, w, a, "active", tier)] = layer_cost(sz, _pl(i, w, a, tier), "active", hw)
            for tier in ("gpu", "cpu"):
                step[(kind, w, tier)] = step_cost(sz, _pl(i, w, "gpu", tier), hw)
        for tier in ("gpu", "cpu"):
            sw[(kind, tier)] = switch_cost(sz, tier, switch_state, hw)
    roles = ("above", "active")
    # A forward pass runs ahead of its activation offloads when the device-to-host copy of a layer's saved
    # tensors takes longer than the layer's forward: after n layers, n * (1 - forward / offload) layers' worth
    # are still on the device. The ILP counts them as gone; the simulator's clock does not (resident weights:
    # the fastest forward, the largest backlog).
    fwd = cost[("decoder", "gpu", "gpu", "below", "gpu")]
    off = hw.link("d2h").io_seconds(sizes[1].saved_bytes)
    return _Tables(backlog=max(0.0, 1.0 - fwd / off) if off > 0 else 0.0,sizes=sizes, cost=cost, step=step, switch=sw,
                   transient={tier: transient_bytes(sizes, tier) for tier in ("gpu", "cpu")},
                   act={(a, r): act_bytes(sizes[1], a, r) for a in ACTS for r in roles},
                   head_act={(a, r): act_bytes(sizes[-1], a, r) for a in ACTS for r in roles})


@dataclass(frozen=True)
class Policy:
    method: str
    blocks: int
    tier: str          # optimizer state (and so gradients): gpu | cpu
    act: str           # decoder layers' activations
    emb_w: str         # embedding weights: gpu | cpu
    head_w: str
    head_act: str
    resident: int      # decoder layers with resident weights (the top ones)
    bottom: int = 0    # the bottom (largest) block's size; 0: ceil(n / blocks)


def _spans(n: int, u: int, bottom: int = 0) -> list[tuple[int, int]]:
    """Decoder layers 1..n cut into u contiguous blocks, bottom-heavy: from the bottom, each block takes
    `bottom` layers (default ceil(n/u)) while enough are left to give every block above one. The bottom block
    is the largest, so its phase is still the worst for memory; a layer in a lower block runs backward in fewer
    phases, so of the cuts with that largest block this one has the fewest backward passes."""
    s = bottom or -(-n // u)
    out, first = [], 1
    for k in range(u):
        size = min(s, n - first + 1 - (u - 1 - k))
        out.append((first, first + size - 1))
        first += size
    return out


def _overlap(a: int, b: int, c: int, d: int) -> int:
    return max(0, min(b, d) - max(a, c) + 1)


def _resident(t: _Tables, p: Policy, cap: int, host_cap: int, switch_state: str) -> tuple[int, int] | None:
    """(resident decoder layers, window bytes) that fit device and host memory, or None (the ILP's accounting
    and the offload lag; the bottom block's phase is the worst: it is the largest block and has every other
    layer above it)."""
    sizes = t.sizes
    n = len(sizes) - 2
    sd, se, sh = sizes[1], sizes[0], sizes[-1]
    full = p.method == "full"
    top = n if full else (p.bottom or -(-n // p.blocks))   # the bottom block's size
    state = memory.trained_layer_device_bytes(sd.params, sd.param_bytes, p.tier)
    lag = int(t.backlog * ((n - top) * sd.saved_frozen_bytes + top * sd.saved_bytes)) if p.act == "cpu" else 0
    base = ((n - top) * t.act[(p.act, "above")] + top * (t.act[(p.act, "active")] + state) + lag
            + t.head_act[(p.head_act, "active" if full else "above")] + t.transient[p.tier])
    if full:
        base += sum(memory.trained_layer_device_bytes(x.params, x.param_bytes, p.tier) for x in (se, sh))
    fixed = (se.param_bytes if p.emb_w == "gpu" else 0) + (sh.param_bytes if p.head_w == "gpu" else 0)
    edge = max(se.param_bytes if p.emb_w == "cpu" else 0, sh.param_bytes if p.head_w == "cpu" else 0)
    if fixed + n * sd.param_bytes + 2 * edge + base <= cap:
        k, win = n, 2 * edge
    else:
        win = 2 * max(edge, sd.param_bytes)
        k = min(n - 1, (cap - fixed - win - base) // sd.param_bytes)
        if k < 0:
            return None
    host = ((n - k) * sd.param_bytes + (se.param_bytes if p.emb_w == "cpu" else 0)
            + (sh.param_bytes if p.head_w == "cpu" else 0)
            + (n * sd.saved_bytes if p.act == "cpu" else 0) + (sh.saved_bytes if p.head_act == "cpu" else 0))
    trained = [sd] * top + ([se, sh] if full else [])   # planner.memory's host rules; no NVMe tier here
    host += sum(max(memory.trained_layer_host_bytes(x.params, x.param_bytes, p.tier, w) for w in (Tier.GPU, Tier.CPU))
                for x in trained)
    big = max(trained, key=lambda x: x.params)
    host += memory.step_host_bytes(big.params, big.param_bytes, p.tier, nvme_weights=False)
    if switch_state == "keep_cpu":
        host += (n * sd.params + ((se.params + sh.params) if full else 0)) * STATE_BYTES
    return None if host > host_cap else (k, win)


def _price(t: _Tables, p: Policy, g: int) -> tuple[list[float], list[float]]:
    """Per phase: step seconds (g micro-batches of every layer by its role, then the block's optimizer step)
    and switch seconds. Resident decoder layers are n-k+1..n."""
    c, st = t.cost, t.step
    n = len(t.sizes) - 2
    k, act, tier = p.resident, p.act, p.tier
    lo = n - k + 1

    def dec(first: int, last: int, role: str, tr: str) -> float:
        if last < first:
            return 0.0
        r = _overlap(first, last, lo, n)
        return r * c[("decoder", "gpu", act, role, tr)] + (last - first + 1 - r) * c[("decoder", "cpu", act, role, tr)]
    full = p.method == "full"
    steps, switches = [], []
    for first, last in ([(1, n)] if full else _spans(n, p.blocks, p.bottom)):
        r = _overlap(first, last, lo, n)
        per_mb = dec(1, first - 1, "below", "gpu") + dec(first, last, "active", tier) + dec(last + 1, n, "above", "gpu")
        opt = r * st[("decoder", "gpu", tier)] + (last - first + 1 - r) * st[("decoder", "cpu", tier)]
        if full:
            per_mb += (c[("embedding", p.emb_w, "gpu", "active", tier)]
                       + c[("head", p.head_w, p.head_act, "active", tier)])
            opt += st[("embedding", p.emb_w, tier)] + st[("head", p.head_w, tier)]
        else:
            per_mb += (c[("embedding", p.emb_w, "gpu", "below", "gpu")]
                       + c[("head", p.head_w, p.head_act, "above", "gpu")])
        steps.append(g * per_mb + opt)
        switches.append((last - first + 1) * t.switch[("decoder", tier)] if p.blocks > 1 else 0.0)
    return steps, switches


_PREFIX: dict = {}


def _block_prefix(n: int, u: int, bottom: int = 0) -> list[int]:
    """P[x] = sum of the block index (0 = bottom) of decoder layers 1..x."""
    key = (n, u, bottom)
    if key not in _PREFIX:
        p = [0]
        for b, (first, last) in enumerate(_spans(n, u, bottom)):
            for _ in range(first, last + 1):
                p.append(p[-1] + b)
        _PREFIX[key] = p
    return _PREFIX[key]


def _cycle(t: _Tables, p: Policy, g: int, steps_per_block: int) -> float:
    """The cycle's seconds in closed form (what summing _price's phases gives): a decoder layer in block b is
    below the block being trained in u-1-b phases, above it in b, and trained in one."""
    c, st = t.cost, t.step
    n = len(t.sizes) - 2
    k, u, act, tier = p.resident, p.blocks, p.act, p.tier
    full = p.method == "full"
    per_mb, opt = 0.0, 0.0
    pre = _block_prefix(n, 1 if full else u, 0 if full else p.bottom)
    for w, cnt, sumb in (("cpu", n - k, pre[n - k]), ("gpu", k, pre[n] - pre[n - k])):
        if not cnt:
            continue
        cb, ca = c[("decoder", w, act, "below", "gpu")], c[("decoder", w, act, "above", "gpu")]
        per_mb += cnt * ((u - 1) * cb + c[("decoder", w, act, "active", tier)]) + sumb * (ca - cb)
        opt += cnt * st[("decoder", w, tier)]
    if full:
        per_mb += c[("embedding", p.emb_w, "gpu", "active", tier)] + c[("head", p.head_w, p.head_act, "active", tier)]
        opt += st[("embedding", p.emb_w, tier)] + st[("head", p.head_w, tier)]
    else:
        per_mb += u * (c[("embedding", p.emb_w, "gpu", "below", "gpu")]
                       + c[("head", p.head_w, p.head_act, "above", "gpu")])
    switches = n * t.switch[("decoder", tier)] if u > 1 else 0.0
    return steps_per_block * (g * per_mb + opt) + switches


def search(t: _Tables, req: Request, mb: int, cap: int, host_cap: int, best: tuple | None,
           acts: tuple[str, ...] = ACTS, blocks: int | None = None) -> tuple | None:
    """The best (score, micro-batch, policy, window bytes) at one micro-batch, improving on `best`; the score is
    planning.score's (the request's objective); `blocks` fixes BCD's block count."""
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
    elif tokens:  # every count: at the same residency, the block count still moves the time per phase
        counts = list(range(req.min_blocks or 1, min(n, req.max_blocks or n) + 1))
    else:  # the fewest blocks for each bottom-block size: memory depends on u only through that size
        counts, seen = [], set()
        for u in range(req.min_blocks or 1, min(n, req.max_blocks or n) + 1):
            if -(-n // u) not in seen:
                seen.add(-(-n // u))
                counts.append(u)
    for tier in ("gpu", "cpu"):
        for act in acts:
            for emb_w in ("gpu", "cpu"):
                for head_w in ("gpu", "cpu"):
                    for head_act in ("gpu", "recompute"):
                        prev, fits = -1, {}

                        def fit_of(bottom, u, tier=tier, act=act, emb_w=emb_w, head_w=head_w,
                                   head_act=head_act, fits=fits):
                            """Memory depends on the partition only through the bottom block's size."""
                            if bottom not in fits:
                                p = Policy(method=req.method, blocks=u, tier=tier, act=act, emb_w=emb_w,
                                           head_w=head_w, head_act=head_act, resident=0, bottom=bottom)
                                fits[bottom] = _resident(t, p, cap, host_cap, req.switch_state)
                            return fits[bottom]
                        for u in counts:
                            if best is not None and (fwd if tokens else u * fwd) >= best[0]:
                                break
                            s0 = n if req.method == "full" else -(-n // u)
                            fit = fit_of(s0, u)
                            if fit is None or (not tokens and fit[0] <= prev):
                                continue  # cycle: at the same residency more blocks only add phases
                            prev = fit[0]
                            # the largest bottom block that keeps this residency: fewer backward passes, free
                            lo, hi = s0, s0 if req.method == "full" else n - u + 1
                            while lo < hi:
                                mid = (lo + hi + 1) // 2
                                f = fit_of(mid, u)
                                lo, hi = (mid, hi) if f is not None and f[0] == fit[0] else (lo, mid - 1)
                            p = Policy(method=req.method, blocks=u, tier=tier, act=act, emb_w=emb_w,
                                       head_w=head_w, head_act=head_act, resident=fit[0],
                                       bottom=0 if lo == s0 else lo)
                            win = fit_of(lo, u)[1]
                            sc = score(_cycle(t, p, g, kk) / kk, u, req.objective) * kk
                            if best is None or sc < best[0]:
                                best = (sc, mb, p, win)
                            if fit[0] == n and not tokens:
                                break
    return best


def quick_plan(prof: ModelProfile, hw: Hardware, req: Request, *, cap_bytes: int | None = None,
               cache: dict | None = None, acts: tuple[str, ...] = ACTS, blocks: int | None = None) -> Plan | None:
    """The fastest plan this search finds, as a Plan (solver status HEURISTIC), or None if nothing fits.
    `cache` keeps priced tables across calls (a sweep's worker passes one); `acts` limits the decoder layers'
    activation policies (a sweep drops offloading when the simulator finds offloads piling up on the device);
    `blocks` fixes the number of BCD blocks instead of searching it."""
    cache = {} if cache is None else cache
    budget = int((req.vram_gib if req.vram_gib is not None else hw.gpu.vram_gib) * GIB)
    reserve = int(req.reserve_gib * GIB)
    cap = cap_bytes if cap_bytes is not None else memory.device_cap_bytes(budget, reserve)
    host_cap = memory.host_usable_bytes(hw)
    if cap <= 0 or req.seq_len > prof.model.max_seq:
        return None
    g_ = hw.gpu
    best = None
    for mb in candidates(req):
        key = (prof.fingerprint, g_.id, g_.bf16_tflops, g_.memory_gbps, g_.h2d_gbps, g_.d2h_gbps, hw.host, hw.eff,
               mb, req.seq_len, req.switch_state)
        t = cache.get(key)
        if t is None:
            t = cache[key] = tables(prof, hw, mb, req.seq_len, req.switch_state)
        best = search(t, req, mb, cap, host_cap, best, acts, blocks)
    if best is None:
        return None
    _score, mb, p, win = best
    return _to_plan(prof, hw, req, budget, reserve, cache, mb, p, win)


def _to_plan(prof, hw, req, budget, reserve, cache, mb, p: Policy, win: int) -> Plan:
    t = next(v for k, v in cache.items() if k[0] == prof.fingerprint and k[-3] == mb and k[1] == hw.gpu.id)
    n = prof.n_decoder
    g = accum(req, mb)
    tokens_per_step = req.seq_len * req.batch   # the global batch
    steps, switches = _price(t, p, g)
    full = p.method == "full"
    blocks = ((Block(first=0, last=n + 1),) if full
              else tuple(Block(first=a, last=b) for a, b in _spans(n, p.blocks, p.bottom)))
    pls = ((_pl(0, p.emb_w, "gpu", p.tier),)
           + tuple(_pl(i, "gpu" if i > n - p.resident else "cpu", p.act, p.tier) for i in range(1, n + 1))
           + (_pl(n + 1, p.head_w, p.head_act, p.tier),))
    phases = tuple(PhasePrediction(block=k, peak_vram_bytes=0, step_seconds=s, switch_seconds=w)
                   for k, (s, w) in enumerate(zip(steps, switches)))
    cycle, rate = cycle_rate(phases, steps_per_block=req.steps_per_block, tokens_per_step=tokens_per_step)
    pred = Prediction(phases=phases, host_ram_bytes=0, nvme_bytes=0, cycle_seconds=cycle, tokens_per_s=rate)
    # the objective in SolverReport's units: seconds per token, or cycle seconds per token of a step
    objective = 1 / rate if req.objective == "tokens" else cycle / tokens_per_step
    solver = SolverReport(status="HEURISTIC", objective_kind=req.objective, objective=objective, bound=0.0, gap=0.0,
                          solve_seconds=0.0, time_limit_s=0.0)
    return build_plan(prof, hw, req, budget, reserve, micro_batch=mb, blocks=blocks, placements=pls,
                      window_bytes=win, solver=solver, predicted=pred)
