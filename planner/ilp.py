"""The ILP: block boundaries, tensor placement, recompute and micro-batch, solved with OR-Tools CP-SAT.

The decoder layers of a model are identical, and that symmetry is what keeps even 80-layer models fast and
provably optimal: within one block every layer has the same role in every phase, so only *how many* of a
block's layers take each placement matters, not which ones. The model is therefore written over counts.

For a micro-batch size and a number of blocks U (the planner loops over both, pruning with a lower bound),
blocks are numbered from the top (j = 0 holds the last decoder layer). Decisions:
  m[j][c]  how many layers of block j take placement combination c = (bf16 weights tier, activations tier);
           sum_c m[j][c] = size of block j >= 1: blocks are contiguous and may differ in size;
  e[c], h[c]  the embedding's and the head's placement (frozen in BCD unless train_embeddings; trained in `full`);
  o[t]     the tier of the active block's optimizer state (fp32 master + AdamW moments): gpu, cpu or nvme;
           gradients stay on the device with it, and stream to the host otherwise;
  win      the prefetch window: two streamed layers (the one computing and the one loading).

Cost, in seconds per micro-batch summed over one cycle (every block trained once). In the phase of block j,
layers below it run forward only (Cb), its layers forward and backward with weight gradients plus their share
of the optimizer step (Cact), layers above it forward and backward for the chain rule (Cab). A layer of block
j is below in j phases and above in U-1-j phases, so the cycle costs
    sum_{j,c} m[j][c] * (j*Cb(c) + (U-1-j)*Cab(c)) + sum_j act[j] + U*(Cb(embedding) + Cab(head)),
linear for a given U. Each C is the layer's schedule ops priced by the one cost model, taking per pass the
busiest stream (compute and transfers overlap).

Pretraining (Problem.train_embeddings) puts the embedding and the head into blocks too. Whether each joins
the bottom / top decoder block or trains in a phase of its own is a separate subproblem (solve's `own`, which
the search enumerates like the state tier), so the model stays linear: with P = U + own phases, the embedding runs
forward only in P-1 phases and is trained in one, the head runs backward for the chain rule in P-1 and is trained
in one; an own embedding phase runs backward through every decoder layer (all above it), an own head phase runs
every decoder layer forward only (all below it). Their optimizer state, gradients and saved activations count in
the phase that trains them (a 128k x 4096 head: 525M parameters, 6.3 GB of fp32 master and moments); an own
phase is one more memory constraint. A tied head also forms the matrix's weight gradient in the embedding's
phase (schedule.priced_as): there it is priced as a trained pass without a step, holding its gradient.

Memory, for every phase j: resident weights + window + activations of the blocks above j (frozen-weight sizes)
and of block j (trainable sizes) + the head's + block j's optimizer state and gradients + a transient reserve
<= budget - reserve. Host RAM and NVMe likewise, each within its tier's usable capacity. Every byte rule here
(bytes per tensor class, the transient reserve, what host RAM holds) is planner.memory's, written over the counts.

Clusters (Problem.cluster, data parallel over N ranks). Each rank is priced on its share of its node
(planner.cluster.rank_hardware: host bandwidths and the CPU optimizer divided among the node's ranks). A trained
layer adds, per step, the reduction of its gradient (pricing.reduce_seconds: an all-reduce, or a reduce-scatter
with sharded state) beyond the one backward it overlaps (pricing.exposed_reduce_seconds), and every phase the rest
of its lowest layer's, which nothing hides (pricing.bottom_reduce_seconds): both linear. Whether the block's
master and moments are sharded is a state choice like the tier (State, state_choices): sharded, each rank steps
and holds shard_params(p, N) of every layer and all-gathers the updated weights. Host RAM and NVMe are constrained
per node: the ranks' buffers times the ranks a node, the frozen weights streamed from it once. Full-parameter
training on N ranks is FSDP: every layer's weights, gradients and state sharded, every pass gathering the layer
(the schedule's gather_weights / reduce_grads ops, priced in each pass at the net stream's busiest-stream share).

What the ILP simplifies (the simulator is the reference): per-pass max() instead of an event timeline, and a
transient reserve that assumes the largest workspace, two in-flight saved sets and one optimizer temporary at
once. The schedule's memory replay checks the result; the planner tightens and solves again if it overflows.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import NamedTuple

from planner import memory
from planner.cluster import SINGLE, Cluster
from planner.costs import LayerSizes
from planner.hardware import Hardware
from planner.memory import RECOMPUTE, STATE_BYTES, Tier, act_bytes, shard_params, transient_bytes
from planner.plan import Placement
from planner.pricing import (  # noqa: F401  (layer_cost, step_cost, switch_cost: read from here by others)
    bottom_reduce_seconds,
    exposed_reduce_seconds,
    layer_cost,
    overlapped_seconds,
    pass_costs,
    reduce_seconds,
    step_cost,
    switch_cost,
)


@dataclass(frozen=True, kw_only=True)
class Problem:
    sizes: tuple[LayerSizes, ...]   # embedding, decoders, head at this micro-batch
    hw: Hardware                    # one rank's view of its node (planner.cluster.rank_hardware)
    method: str                     # bcd | full
    grad_accum: int                 # micro-batches per step on each rank
    cap_bytes: int                  # budget - reserve
    steps_per_block: int
    switch_state: str
    train_embeddings: bool = False  # bcd: the embedding and the head are trained in blocks too (pretraining)
    tied: bool = False              # the head's matrix is the embedding's (schedule.priced_as)
    cluster: Cluster = SINGLE       # data parallel over cluster.world ranks (full: FSDP)
    shard: bool | None = None       # bcd on 2+ ranks: shard the active block's state; None: a choice (State)


class State(NamedTuple):
    """A subproblem's optimizer-state choice on a cluster: its tier and whether it is sharded over the ranks.
    On one GPU (and for FSDP, always sharded) the choice is the tier alone, a plain Tier."""
    tier: str
    shard: bool


def _all_choices(pb: Problem) -> tuple:
    ts = memory.tiers(pb.hw)
    if _fsdp(pb) > 1:   # FSDP2 offloads to host memory only (runtime/fsdp.py)
        return tuple(t for t in ts if t != Tier.NVME)
    if pb.cluster.world <= 1 or pb.method == "full":
        return ts
    return tuple(State(t, s) for t in ts for s in ((False, True) if pb.shard is None else (pb.shard,)))


def state_choices(pb: Problem) -> tuple:
    """The optimizer-state choices a search enumerates for this problem: the tiers, and on a cluster (bcd) each
    tier sharded or not, unless the request fixed it. An unsharded choice is left out when the sharded one on the
    same tier dominates it: sharding never needs more memory (device, host or NVMe), so when no cost in its
    tables is higher either (the 1/N optimizer step saves more than the all-gather adds, as with a CPU optimizer
    shared by a node's ranks), its optimum is at least as good."""
    choices = _all_choices(pb)
    if pb.cluster.world <= 1 or pb.method == "full" or pb.shard is not None:
        return choices
    t, _ = _costs(pb)

    def dominated(tier) -> bool:
        on, off = State(tier, True), State(tier, False)
        return all(t[k]["bottom"][on] <= t[k]["bottom"][off] and all(
            a <= b for a, b in zip(t[k]["active"][on], t[k]["active"][off])) for k in t)
    return tuple(c for c in choices if c.shard or not dominated(c.tier))


def _state(choice) -> tuple[str, bool]:
    return (choice.tier, choice.shard) if isinstance(choice, State) else (choice, False)


def _fsdp(pb: Problem) -> int:
    """The world FSDP shards over (full-parameter training on 2+ ranks), else 1."""
    return pb.cluster.world if pb.method == "full" and pb.cluster.world > 1 else 1


OWN = ((False, False), (True, False), (False, True), (True, True))  # (embedding, head) in a block of its own


def layouts(pb: Problem) -> tuple[tuple[bool, bool], ...]:
    """The `own` choices solve() takes for this problem: the four ways to place a trained embedding and head
    (joined to the bottom / top decoder block, or alone), or only the frozen one."""
    return OWN if pb.train_embeddings and pb.method == "bcd" else OWN[:1]


@dataclass(frozen=True, kw_only=True)
class Solution:
    status: str
    objective_s: float        # cycle seconds per micro-batch-step unit (see module doc), from the solver
    bound_s: float
    solve_seconds: float      # wall clock (reported only; nothing decides on it)
    work: float               # CP-SAT's deterministic time: the same on any machine and load
    wall_capped: bool         # stopped by the wall-clock safety net rather than by `work_limit`
    starts: tuple[int, ...]   # layers where blocks start, bottom-up ((0,) for full; 0 / n+1 when trained)
    placements: tuple[Placement, ...]
    window_bytes: int
    shard: bool = False       # the optimizer state is sharded over the ranks (always with FSDP)


def combos(kind: str, ws: tuple[str, ...]) -> list[tuple[str, str]]:
    """(weights tier, activation placement) pairs a layer of this kind may take, weights on the tiers `ws`."""
    acts = [Tier.GPU] if kind == "embedding" else [Tier.GPU, Tier.CPU, RECOMPUTE]
    return list(itertools.product(ws, acts))


def _placement(i: int, c: tuple[str, str], tier: str) -> Placement:
    return Placement(layer=i, weights=c[0], activations=c[1], master=tier, moments=tier,
                     grads=Tier.GPU if tier == Tier.GPU else Tier.CPU)


_TABLES: dict[int, tuple] = {}   # id(problem) -> (problem, its tables): a search's few problems, each solved often


def _costs(pb: Problem):
    """Cost and byte tables per layer kind and combination, priced once per problem (decoder layers are
    identical)."""
    hit = _TABLES.get(id(pb))
    if hit is None or hit[0] is not pb:
        if len(_TABLES) > 32:
            _TABLES.clear()
        hit = _TABLES[id(pb)] = (pb, _price(pb, memory.tiers(pb.hw)))
    return hit[1]


def _price(pb: Problem, tiers: tuple[Tier, ...]):
    hw, sizes, g, cl = pb.hw, pb.sizes, pb.grad_accum, pb.cluster
    kmul = max(1, pb.steps_per_block)
    fs = _fsdp(pb)
    t = {}
    for i in (0, 1, len(sizes) - 1):
        sz = sizes[i]
        cs = combos(sz.kind, tiers)
        kw = dict(cluster=cl, fsdp=fs)
        active, bottom = {}, {}
        for choice in _all_choices(pb):
            tier, shard = _state(choice)
            shards = cl.world if shard or fs > 1 else 1
            r = reduce_seconds(sz, shard, cl) if cl.world > 1 and fs == 1 else 0.0
            passes = [pass_costs(sz, _placement(i, c, tier), "active", hw, **kw) for c in cs]
            active[choice] = [f + b + step_cost(sz, _placement(i, c, tier), hw, shards=shards, cluster=cl,
                                                gather=fs == 1) / g
                              + switch_cost(sz, tier, pb.switch_state, hw, shards=shards) / (g * kmul)
                              + exposed_reduce_seconds(r, b) / g
                              for c, (f, b) in zip(cs, passes)]
            bottom[choice] = bottom_reduce_seconds(r, min(b for _, b in passes)) / g
        t[sz.kind] = {
            "combos": cs,
            "below": [layer_cost(sz, _placement(i, c, Tier.GPU), "below", hw, **kw) for c in cs],
            "above": [layer_cost(sz, _placement(i, c, Tier.GPU), "above", hw, **kw) for c in cs],
            "active": active,
            "bottom": bottom,   # per phase whose lowest trained layer is of this kind
            "act_above": [act_bytes(sz, c[1], "above") for c in cs],
            "act_active": [act_bytes(sz, c[1], "active") for c in cs],
            # a tied head while the embedding's block trains: a trained pass, no step (schedule.priced_as)
            "tied": [layer_cost(sz, _placement(i, c, "gpu"), "active", hw, **kw) for c in cs],
        }
    return t, tiers


def _shards(pb: Problem, choice) -> tuple[str, int, int]:
    """(state tier, ranks the master and moments are cut over, ranks the gradients are) of a state choice."""
    tier, shard = _state(choice)
    fs = _fsdp(pb)
    return tier, pb.cluster.world if shard or fs > 1 else 1, fs


def _bottoms(t, choice, phases: int, own_e: bool, own_h: bool, te: bool, full: bool) -> float:
    """Seconds of the lowest trained layer's reduction that no backward hides (bottom_reduce_seconds), over a
    cycle: one per phase, of the kind of layer lowest in it (the embedding in its phase when it trains, the head
    in its own phase, a decoder layer otherwise)."""
    d, e, h = (t[k]["bottom"][choice] for k in ("decoder", "embedding", "head"))
    if full:
        return e
    if not te:
        return phases * d
    return e + own_h * h + (phases - 1 - own_h) * d


def ends_bound(pb: Problem, blocks: int, choice) -> float:
    """A lower bound on a cycle's seconds outside the decoder layers' passes and steps: the embedding and the
    head (each trained in one phase, its cheapest way, when they train) and the reductions no backward hides."""
    t, _ = _costs(pb)
    d, e, h = t["decoder"], t["embedding"], t["head"]
    u = blocks
    if pb.train_embeddings:  # each trained in one phase (its own or a decoder block's), cheapest way
        return ((u - 1) * (min(e["below"]) + min(h["above"])) + min(e["active"][choice])
                + min(h["active"][choice]) + (u - 1) * d["bottom"][choice]
                + min(d["bottom"][choice], e["bottom"][choice]))
    return u * (min(e["below"]) + min(h["above"])) + u * d["bottom"][choice]


def lower_bound(pb: Problem, blocks: int, tier: str) -> float:
    """A valid lower bound on the cycle cost with `blocks` blocks and the optimizer state on `tier`.

    A decoder layer in block j (from the top) runs below the trained block in j phases (forward only, Cb) and
    above it in U-1-j (forward and backward, Cab = Cb + (Cab - Cb)); so over its U-1 untrained phases it costs
    at least (U-1) * min Cb of its weights' tier + (above-phases) * delta, delta the smallest Cab - Cb of any
    placement. Each layer is trained once, at its cheapest trained pass.

    Memory couples the rest. Let s be the largest block's size (at least ceil(n/U)). Its phase holds, beside
    the transient reserve, its s layers' optimizer state and gradients (gpu tier), the k decoder layers whose
    weights stay resident and, if any layer streams, the two-layer window: that caps k for each s. The sum of
    above-phases over the layers is smallest when the bottom blocks are as large as s allows (a layer in the
    bottom block is never above): each block gets one layer, the n-U others fill blocks s-1 at a time from the
    bottom, giving U(U-1)/2 + (s-1) f(f-1)/2 + f r (f full blocks, r layers in the next). The bound is the
    minimum over s. (These are the ILP's own device-memory terms, without the activations, which can all
    leave the device, and without the embedding and head, which can stream.)"""
    t, tiers = _costs(pb)
    d, e, h = t["decoder"], t["embedding"], t["head"]
    n = sum(1 for s in pb.sizes if s.kind == "decoder")
    choice = tier
    tier, shards, grad_shards = _shards(pb, choice)
    active = min(d["active"][choice])
    if pb.method == "full":
        return n * active + min(e["active"][choice]) + min(h["active"][choice]) + e["bottom"][choice]
    u = blocks
    on_gpu = min(x for x, c in zip(d["below"], d["combos"]) if c[0] == Tier.GPU)
    off = min(x for x, c in zip(d["below"], d["combos"]) if c[0] != Tier.GPU)
    delta = min(a - b for a, b in zip(d["above"], d["below"]))
    sd = pb.sizes[1]
    w = max(1, sd.param_bytes)
    state = memory.trained_layer_device_bytes(sd.params, sd.param_bytes, tier, shards, grad_shards)  # a layer
    room = pb.cap_bytes - transient_bytes(pb.sizes, tier)
    fixed = ends_bound(pb, u, choice) + n * active
    best = float("inf")
    # with no device state, s costs nothing: the largest s (the smallest chain) is the minimum
    for s in ([n - u + 1] if state == 0 else range(-(-n // u), n - u + 2)):
        left = room - s * state
        if left < 0:
            break
        k = n if left >= n * w else max(0, min(n - 1, (left - 2 * w) // w))
        forward = (u - 1) * (k * min(on_gpu, off) + (n - k) * off)
        if delta >= 0:
            f, r = divmod(n - u, s - 1) if s > 1 else (0, 0)
            above = u * (u - 1) // 2 + (s - 1) * f * (f - 1) // 2 + f * r
            chain = above * delta
        else:  # cannot happen with these costs (backward is never free); kept valid anyway
            chain = (u - 1) * n * delta
        best = min(best, forward + chain + fixed)
    return best


def _cp_model():
    """OR-Tools' CP-SAT module, imported without pandas. cp_model imports pandas at its top (0.4-0.6 s, a third
    of a plan's start-up) for its *_series helpers alone, which the planner does not call; its import only reads
    the names pandas.Index and pandas.Series (annotations). Unless pandas is loaded already, a stand-in module
    with those two names serves the import and is taken out of sys.modules again, so any later `import pandas`
    gets the real one."""
    import sys
    if "ortools.sat.python.cp_model" in sys.modules or "pandas" in sys.modules:
        from ortools.sat.python import cp_model
        return cp_model
    import types
    stand_in = types.ModuleType("pandas", "stand-in for cp_model's import (planner.ilp._cp_model)")
    stand_in.Index = type("Index", (), {})
    stand_in.Series = type("Series", (), {})
    sys.modules["pandas"] = stand_in
    try:
        from ortools.sat.python import cp_model
    finally:
        if sys.modules.get("pandas") is stand_in:
            del sys.modules["pandas"]
    return cp_model


def solve(pb: Problem, blocks: int, tier: str, *, work_limit: float = 10.0, time_limit_s: float = 60.0,
          workers: int = 1, min_memory: bool = False, feasibility: bool = False,
          own: tuple[bool, bool] = (False, False)) -> Solution | None:
    """Solve for exactly `blocks` blocks of decoder layers (1 for `full`) with the optimizer state on `tier`.
    With min_memory, minimise the worst phase's device bytes instead (to tell the user the smallest feasible
    budget). None when infeasible; status UNKNOWN when the work ran out before a solution or a proof. With
    feasibility, any solution will do (its cost is not minimal). `own` (with pb.train_embeddings): whether the
    embedding / the head train in a block of their own (one of layouts(pb)) instead of joining the bottom / top
    decoder block.

    The solve is bounded by `work_limit`, CP-SAT's deterministic time (a count of the solver's basic
    operations scaled to roughly seconds), so with one worker and a fixed seed the same problem gives the same
    answer on any machine and under any load. `time_limit_s` is a wall-clock safety net only; when it stops the
    solve first, the Solution says so (wall_capped) and the answer may depend on the machine."""
    cp_model = _cp_model()
    hw, sizes = pb.hw, pb.sizes
    t, tiers = _costs(pb)
    choice = tier
    tier, shards, grad_shards = _shards(pb, choice)
    fs = _fsdp(pb)
    ranks = pb.cluster.gpus_per_node
    nvme = Tier.NVME in tiers
    full = pb.method == "full"
    n = sum(1 for s in sizes if s.kind == "decoder")
    U = 1 if full else blocks
    if U > n or U < 1 or tier not in tiers or (pb.switch_state == "keep_nvme" and not nvme):
        return None
    te = pb.train_embeddings and not full
    own_e, own_h = own if te else (False, False)
    P = U + own_e + own_h   # phases in a cycle
    # a tied head forms the matrix's gradient in the embedding's phase, when that is not the head's own
    tied = pb.tied and te and P > 1
    d, E, H = t["decoder"], t["embedding"], t["head"]
    nc, ne, nh = len(d["combos"]), len(E["combos"]), len(H["combos"])
    top = max(max(d["above"]), max(d["active"][choice]), max(E["below"]), max(H["above"]),
              max(H["active"][choice]), max(E["active"][choice]))
    unit = top / 2000.0 if top > 0 else 1e-9  # integer-scaled costs: 1/2000 of the dearest layer pass

    def q(x: float) -> int:
        return int(round(x / unit))

    def kib(x) -> int:
        return -(-int(x) // 1024)

    m = cp_model.CpModel()
    mc = [[m.new_int_var(0, n, f"m{j}_{c}") for c in range(nc)] for j in range(U)]
    size = [sum(row) for row in mc]
    for j in range(U):
        m.add(size[j] >= 1)
    m.add(sum(size) == n)
    e = [m.new_bool_var(f"e{c}") for c in range(ne)]
    h = [m.new_bool_var(f"h{c}") for c in range(nh)]
    m.add_exactly_one(e)
    m.add_exactly_one(h)
    if fs > 1:
        # FSDP as torch runs it (runtime/fsdp.py): one offload policy for the whole model (CPUOffloadPolicy keeps
        # the weight shards where the state is: weights on the state's tier) and no activation offload
        def banned(c) -> bool:
            return c[0] != tier or c[1] == Tier.CPU
        for j in range(U):
            for c in range(nc):
                if banned(d["combos"][c]):
                    m.add(mc[j][c] == 0)
        for v, cs in ((e, E["combos"]), (h, H["combos"])):
            for c in range(len(cs)):
                if banned(cs[c]):
                    m.add(v[c] == 0)

    # --- objective: scaled seconds per micro-batch over one cycle
    terms = [mc[j][c] * q(j * d["below"][c] + (U - 1 - j) * d["above"][c] + d["active"][choice][c]
                          + own_e * d["above"][c] + own_h * d["below"][c])
             for j in range(U) for c in range(nc)]
    if te:  # trained in one phase, frozen in the P - 1 others
        terms += [q((P - 1) * E["below"][c] + E["active"][choice][c]) * e[c] for c in range(ne)]
        terms += [q((P - 1 - tied) * H["above"][c] + H["active"][choice][c] + tied * H["tied"][c]) * h[c]
                  for c in range(nh)]
    elif full:
        terms += [q(E["active"][choice][c]) * e[c] for c in range(ne)]
        terms += [q(H["active"][choice][c]) * h[c] for c in range(nh)]
    else:
        terms += [U * q(E["below"][c]) * e[c] for c in range(ne)]
        terms += [U * q(H["above"][c]) * h[c] for c in range(nh)]
    net_tail = _bottoms(t, choice, P, own_e, own_h, te, full)   # 0 on one GPU
    if net_tail:
        terms.append(q(net_tail))

    # --- device memory, KiB
    sd, se, sh = sizes[1], sizes[0], sizes[-1]

    def count(where: str, pos: int):
        """Layers (decoder counts, embedding and head) whose combination has `where` at position pos."""
        return (sum(mc[j][c] for j in range(U) for c in range(nc) if d["combos"][c][pos] == where),
                sum(e[c] for c in range(ne) if E["combos"][c][pos] == where),
                sum(h[c] for c in range(nh) if H["combos"][c][pos] == where))

    def wk(x) -> int:
        """KiB of a layer's weights one rank holds on its tier (FSDP: its shard)."""
        return kib(memory.weight_shard_bytes(x.param_bytes, x.params, fs))

    def weight_kib(where: str):
        nd, ee, hh = count(where, 0)
        return wk(sd) * nd + wk(se) * ee + wk(sh) * hh

    def dev_state(x) -> int:
        return memory.trained_layer_device_bytes(x.params, x.param_bytes, tier, shards, grad_shards)

    w_gpu = weight_kib(Tier.GPU)
    streamed = m.new_bool_var("dec_streamed")
    m.add(n - count(Tier.GPU, 0)[0] <= n * streamed)
    big_w = max(kib(x.param_bytes) for x in (sd, se, sh))
    win = m.new_int_var(0, 2 * (big_w + (max(wk(x) for x in (sd, se, sh)) if fs > 1 else 0)), "win")
    if fs > 1:   # FSDP gathers every layer: two whole layers, and the shards loaded for them when off the device
        mwk = max(wk(x) for x in (sd, se, sh))
        m.add(win >= 2 * big_w + 2 * mwk * streamed)
        m.add(win >= 2 * big_w + 2 * mwk * (1 - count(Tier.GPU, 0)[1]))
        m.add(win >= 2 * big_w + 2 * mwk * (1 - count(Tier.GPU, 0)[2]))
    m.add(win >= 2 * kib(sd.param_bytes) * streamed)
    m.add(win >= 2 * kib(se.param_bytes) * (1 - count(Tier.GPU, 0)[1]))
    m.add(win >= 2 * kib(sh.param_bytes) * (1 - count(Tier.GPU, 0)[2]))
    head_act = sum(kib(act_bytes(sh, H["combos"][c][1], "active" if full else "above")) * h[c] for c in range(nh))
    state = kib(dev_state(sd))
    fixed = win + w_gpu + head_act + kib(transient_bytes(sizes, tier))
    if full:
        fixed += kib(sum(dev_state(x) for x in (se, sh)))
    # a trained embedding / head: its state and gradients, and the head's saved activations at trainable size
    e_extra = (kib(dev_state(se))
               + kib(act_bytes(se, Tier.GPU, "active")) if te else 0)   # it saves the token ids
    # the tied head in the embedding's phase: saves at trainable size, its gradient held on the device
    h_tied = (sum((kib(act_bytes(sh, H["combos"][c][1], "active")) - kib(act_bytes(sh, H["combos"][c][1], "above")))
                  * h[c] for c in range(nh)) + kib(sh.param_bytes)) if tied else 0
    e_extra = e_extra + h_tied
    h_extra = (sum((kib(act_bytes(sh, H["combos"][c][1], "active")) - kib(act_bytes(sh, H["combos"][c][1], "above")))
                   * h[c] for c in range(nh)) + kib(dev_state(sh))
               if te else 0)
    peak = m.new_int_var(0, 1 << 50, "peak") if min_memory else None
    above = 0  # activations of the blocks above block j, built up as j descends
    phase_bytes = []
    for j in range(U):
        acts = above + sum(kib(d["act_active"][c]) * mc[j][c] for c in range(nc))
        phase_bytes.append(fixed + acts + state * size[j] + (h_extra if te and j == 0 and not own_h else 0)
                           + (e_extra if te and j == U - 1 and not own_e else 0))
        nxt = m.new_int_var(0, 1 << 50, f"above{j}")
        m.add(nxt == above + sum(kib(d["act_above"][c]) * mc[j][c] for c in range(nc)))
        above = nxt
    if own_e:  # every decoder layer above the embedding
        phase_bytes.append(fixed + above + e_extra)
    if own_h:  # every decoder layer below the head: nothing saved
        phase_bytes.append(fixed + h_extra)
    for expr in phase_bytes:
        m.add(peak >= expr) if min_memory else m.add(expr <= int(pb.cap_bytes // 1024))

    # --- host RAM and NVMe, KiB: planner.memory's rules over the counts. lmax, the largest block, holds the
    # most trained-layer bytes; a layer's weights tier is not known per block, so the costliest one counts.
    lmax = m.new_int_var(1, n, "lmax")
    for j in range(U):
        m.add(lmax >= size[j])
    act_cpu = (kib(sd.saved_bytes) * count(Tier.CPU, 1)[0] + kib(sh.saved_bytes) * count(Tier.CPU, 1)[2])
    edges = (se, sh) if full else ()
    trained_edges = (se, sh) if full or te else ()

    def layer_host(x) -> int:
        return max(memory.trained_layer_host_bytes(x.params, x.param_bytes, tier, w, shards, grad_shards)
                   for w in tiers)

    def state_kib(x) -> int:
        return kib(shard_params(x.params, shards) * STATE_BYTES)

    def largest_block(layer_kib, name: str):
        """KiB of the block holding the most, layer_kib(x) per layer (pretraining: the embedding and the head
        count in the block or the phase that trains them)."""
        if not te:
            return layer_kib(sd) * lmax
        most = m.new_int_var(0, 1 << 50, name)
        for j in range(U):
            m.add(most >= layer_kib(sd) * size[j] + (layer_kib(se) if j == U - 1 and not own_e else 0)
                  + (layer_kib(sh) if j == 0 and not own_h else 0))
        m.add(most >= layer_kib(se) * own_e)
        m.add(most >= layer_kib(sh) * own_h)
        return most
    keep_all = kib((n * shard_params(sd.params, shards) + sum(shard_params(x.params, shards) for x in trained_edges))
                   * STATE_BYTES)
    big = max((sd,) + trained_edges, key=lambda x: x.params)
    window = memory.step_host_bytes(big.params, big.param_bytes, tier, nvme_weights=nvme, shards=shards)
    # the prefetch window (win) is at most two of the largest layers, so is the NVMe staging that follows it
    staging = memory.nvme_staging_bytes(2, max(x.param_bytes for x in (sd, se, sh))) if nvme else 0
    # one node: each of its ranks holds its own buffers; the weights streamed from host memory are held once for
    # all of them (FSDP: a shard each) (memory.host_breakdown)
    shared = ranks if fs > 1 else 1
    host = (shared * weight_kib(Tier.CPU)
            + ranks * (act_cpu + kib(staging) + (keep_all if pb.switch_state == "keep_cpu" else 0)
                       + largest_block(lambda x: kib(layer_host(x)), "host_block")
                       + kib(sum(layer_host(x) for x in edges)) + kib(window)))
    m.add(host <= memory.host_usable_bytes(hw) // 1024)
    if nvme:
        nv = shared * weight_kib(Tier.NVME) + ranks * (keep_all if pb.switch_state == "keep_nvme" else 0)
        if tier == Tier.NVME:
            nv += ranks * (largest_block(state_kib, "nvme_block")
                           + kib(sum(shard_params(x.params, shards) for x in edges) * STATE_BYTES))
        m.add(nv <= memory.nvme_usable_bytes(hw) // 1024)

    if not feasibility:  # a feasibility check stops at the first solution
        m.minimize(peak if min_memory else sum(terms))
    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = max(1e-3, work_limit)
    solver.parameters.max_time_in_seconds = max(0.02, time_limit_s)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 1
    solver.parameters.linearization_level = 2  # the LP relaxation is what proves these optimal quickly
    solver.parameters.max_presolve_iterations = 1  # small models: more presolve rounds cost more than they save
    # presolve's probing takes a fifth of the wall time of these small solves and, with the LP relaxation
    # doing the proving, gains nothing: 7B's search spends 20% less CPU without it, 70B's 20% less
    solver.parameters.cp_model_probing_level = 0
    t0 = time.perf_counter()
    status = solver.solve(m)
    took = time.perf_counter() - t0
    work = solver.deterministic_time
    capped = status not in (cp_model.OPTIMAL, cp_model.INFEASIBLE) and took >= 0.98 * max(0.02, time_limit_s)
    scale = 1024 if min_memory else unit
    if status == cp_model.UNKNOWN:
        return Solution(status="UNKNOWN", objective_s=float("inf"),
                        bound_s=max(0.0, solver.best_objective_bound) * scale, solve_seconds=took, work=work,
                        wall_capped=capped, starts=(), placements=(), window_bytes=0)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    # Blocks are numbered from the top; layers are laid out bottom-up, each block's combos in sorted order.
    per_block = [[c for c in range(nc) for _ in range(solver.value(mc[j][c]))] for j in reversed(range(U))]
    pls = [_placement(0, E["combos"][next(c for c in range(ne) if solver.value(e[c]))], tier)]
    starts, i = [], 1
    for blk in per_block:
        starts.append(i)
        for c in blk:
            pls.append(_placement(i, d["combos"][c], tier))
            i += 1
    pls.append(_placement(i, H["combos"][next(c for c in range(nh) if solver.value(h[c]))], tier))
    if te:  # the embedding's block starts at 0; an own head block at n + 1
        starts = [0] + starts if own_e else [0] + starts[1:]
        starts += [n + 1] if own_h else []
    return Solution(status=solver.status_name(status), objective_s=solver.objective_value * scale, shard=shards > 1,
                    bound_s=solver.best_objective_bound * scale, solve_seconds=took, work=work,
                    wall_capped=capped, starts=(0,) if full else tuple(starts), placements=tuple(pls),
                    window_bytes=solver.value(win) * 1024)
