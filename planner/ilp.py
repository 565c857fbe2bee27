"""The ILP: block boundaries, tensor placement, recompute and micro-batch, solved with OR-Tools CP-SAT.

The decoder layers of a model are identical, and that symmetry is what keeps even 80-layer models fast and
provably optimal: within one block every layer has the same role in every phase, so only *how many* of a
block's layers take each placement matters, not which ones. The model is therefore written over counts.

For a micro-batch size and a number of blocks U (the planner loops over both, pruning with a lower bound),
blocks are numbered from the top (j = 0 holds the last decoder layer). Decisions:
  m[j][c]  how many layers of block j take placement combination c = (bf16 weights tier, activations tier);
           sum_c m[j][c] = size of block j >= 1: blocks are contiguous and may differ in size;
  e[c], h[c]  the embedding's and the head's placement (both frozen in BCD, trained in `full`);
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

Memory, for every phase j: resident weights + window + activations of the blocks above j (frozen-weight sizes)
and of block j (trainable sizes) + the head's + block j's optimizer state and gradients + a transient reserve
<= budget - reserve. Host RAM and NVMe capacity likewise.

What the ILP simplifies (the simulator is the reference): per-pass max() instead of an event timeline, and a
transient reserve that assumes the largest workspace, two in-flight saved sets and one optimizer temporary at
once. The schedule's memory replay checks the result; the planner tightens and solves again if it overflows.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from planner.costs import GRAD_BYTES, MASTER_BYTES, MOMENT_BYTES, STATE_BYTES, LayerSizes, overlapped_seconds
from planner.hardware import GIB, Hardware
from planner.plan import Placement
from planner.schedule import Builder, optimizer_ops, pass_ops

HOST_RAM_USABLE = 0.85    # of host RAM, the rest for the OS, the process and page cache
NVME_USABLE = 0.95


@dataclass(frozen=True, kw_only=True)
class Problem:
    sizes: tuple[LayerSizes, ...]   # embedding, decoders, head at this micro-batch
    hw: Hardware
    method: str                     # bcd | full
    micro_batch: int
    grad_accum: int
    cap_bytes: int                  # budget - reserve
    steps_per_block: int
    switch_state: str
    max_blocks: int | None = None   # optional user limit


@dataclass(frozen=True, kw_only=True)
class Solution:
    status: str
    objective_s: float        # cycle seconds per micro-batch-step unit (see module doc), from the solver
    bound_s: float
    solve_seconds: float
    starts: tuple[int, ...]   # decoder layers where blocks start (bcd) or (0,) for full
    placements: tuple[Placement, ...]
    window_bytes: int
    state_tier: str


def combos(kind: str, nvme: bool) -> list[tuple[str, str]]:
    ws = ["gpu", "cpu"] + (["nvme"] if nvme else [])
    acts = ["gpu"] if kind == "embedding" else ["gpu", "cpu", "recompute"]
    return list(itertools.product(ws, acts))


def _placement(i: int, c: tuple[str, str], tier: str) -> Placement:
    return Placement(layer=i, weights=c[0], activations=c[1], master=tier, moments=tier,
                     grads="gpu" if tier == "gpu" else "cpu")


def layer_cost(sz: LayerSizes, pl: Placement, role: str, hw: Hardware, *, lowest: bool = False) -> float:
    """Seconds of one layer in one micro-batch: forward pass, plus backward unless below the block."""
    fwd, bwd = Builder(2), Builder(2)
    pass_ops(fwd, pl, sz, role, "fwd", 0, None, sz.out_bytes, False)
    t = overlapped_seconds(fwd.ops, hw)
    if role != "below":
        pass_ops(bwd, pl, sz, role, "bwd", 0, None, sz.out_bytes, lowest)
        t += overlapped_seconds(bwd.ops, hw)
    return t


def step_cost(sz: LayerSizes, pl: Placement, hw: Hardware) -> float:
    b = Builder(0)
    optimizer_ops(b, pl, sz, ())
    return overlapped_seconds(b.ops, hw)


def switch_cost(sz: LayerSizes, tier: str, policy: str, hw: Hardware) -> float:
    """Moving one layer's optimizer state in and the previous block's out at a block switch."""
    if policy == "reset":
        return 0.0
    keep = "cpu" if policy == "keep_cpu" else "nvme"
    if tier == keep:
        return 0.0
    nbytes = sz.params * STATE_BYTES
    if keep == "nvme":
        return max(hw.link("nvme_read").io_seconds(nbytes), hw.link("nvme_write").io_seconds(nbytes))
    return max(hw.link("h2d").io_seconds(nbytes), hw.link("d2h").io_seconds(nbytes))


def act_bytes(sz: LayerSizes, act: str, role: str) -> int:
    """Device bytes a layer holds for backward while the rest of the pass runs."""
    if role == "below":
        return 0
    return {"gpu": sz.saved(role), "cpu": 0, "recompute": sz.out_bytes}[act]


def transient_bytes(sizes, tier: str) -> int:
    dec = [s for s in sizes if s.kind == "decoder"]
    big = max(sizes, key=lambda s: s.params)
    ws = max(s.workspace_bytes for s in sizes)
    inflight = 2 * max(s.saved_bytes for s in dec) if dec else 0
    temp = big.params * (MASTER_BYTES if tier == "gpu" else GRAD_BYTES)
    hidden = 2 * max(s.out_bytes for s in sizes)
    return ws + inflight + temp + hidden



_COSTS: dict = {}


def _costs(pb: Problem, nvme: bool):
    """Cost and byte tables per layer kind and combination, priced once (decoder layers are identical)."""
    key = (id(pb), nvme)
    if key in _COSTS and _COSTS[key][0] is pb:
        return _COSTS[key][1]
    _COSTS.clear()
    _COSTS[key] = (pb, _price(pb, nvme))
    return _COSTS[key][1]


def _price(pb: Problem, nvme: bool):
    hw, sizes, g = pb.hw, pb.sizes, pb.grad_accum
    tiers = ["gpu", "cpu"] + (["nvme"] if nvme else [])
    kmul = max(1, pb.steps_per_block)
    t = {}
    for i in (0, 1, len(sizes) - 1):
        sz = sizes[i]
        cs = combos(sz.kind, nvme)
        t[sz.kind] = {
            "combos": cs,
            "below": [layer_cost(sz, _placement(i, c, "gpu"), "below", hw) for c in cs],
            "above": [layer_cost(sz, _placement(i, c, "gpu"), "above", hw) for c in cs],
            "active": {tier: [layer_cost(sz, _placement(i, c, tier), "active", hw)
                              + step_cost(sz, _placement(i, c, tier), hw) / g
                              + switch_cost(sz, tier, pb.switch_state, hw) / (g * kmul) for c in cs]
                       for tier in tiers},
            "act_above": [act_bytes(sz, c[1], "above") for c in cs],
            "act_active": [act_bytes(sz, c[1], "active") for c in cs],
        }
    return t, tiers


def lower_bound(pb: Problem, blocks: int, nvme: bool) -> float:
    """A valid lower bound on the cycle cost with `blocks` blocks: every decoder layer runs at least a cheapest
    forward in every phase but its own, and its cheapest trained pass in its own."""
    t, tiers = _costs(pb, nvme)
    d, e, h = t["decoder"], t["embedding"], t["head"]
    n = sum(1 for s in pb.sizes if s.kind == "decoder")
    cheapest = min(min(d["below"]), min(d["above"]))
    active = min(min(v) for v in d["active"].values())
    if pb.method == "full":
        return n * active + min(min(v) for v in e["active"].values()) + min(min(v) for v in h["active"].values())
    return (blocks - 1) * n * cheapest + n * active + blocks * (min(e["below"]) + min(h["above"]))


def solve(pb: Problem, blocks: int, *, time_limit_s: float = 10.0, workers: int = 1,
          min_memory: bool = False) -> Solution | None:
    """Solve for exactly `blocks` blocks (1 for `full`). With min_memory, minimise the worst phase's device
    bytes instead (to tell the user the smallest feasible budget). None when infeasible."""
    from ortools.sat.python import cp_model

    hw, sizes = pb.hw, pb.sizes
    nvme = hw.host.nvme_gib > 0
    if pb.switch_state == "keep_nvme" and not nvme:
        return None
    t, tiers = _costs(pb, nvme)
    full = pb.method == "full"
    n = sum(1 for s in sizes if s.kind == "decoder")
    U = 1 if full else blocks
    if U > n or U < 1:
        return None
    d, E, H = t["decoder"], t["embedding"], t["head"]
    nc = len(d["combos"])
    top = max(max(d["above"]), max(max(v) for v in d["active"].values()), max(E["below"]), max(H["above"]),
              max(max(v) for v in H["active"].values()), max(max(v) for v in E["active"].values()))
    unit = top / 50000.0 if top > 0 else 1e-9

    def q(x: float) -> int:
        return int(round(x / unit))

    m = cp_model.CpModel()
    mc = [[m.new_int_var(0, n, f"m{j}_{c}") for c in range(nc)] for j in range(U)]
    size = [sum(row) for row in mc]
    for j in range(U):
        m.add(size[j] >= 1)
    m.add(sum(size) == n)
    e = [m.new_bool_var(f"e{c}") for c in range(len(E["combos"]))]
    h = [m.new_bool_var(f"h{c}") for c in range(len(H["combos"]))]
    m.add_exactly_one(e)
    m.add_exactly_one(h)
    o = {tier: m.new_bool_var(f"o_{tier}") for tier in tiers}
    m.add_exactly_one(o.values())

    # --- objective
    terms = []
    for j in range(U):
        for c in range(nc):
            terms.append(mc[j][c] * q(j * d["below"][c] + (U - 1 - j) * d["above"][c]))
        a = m.new_int_var(0, q(top) * n + 1, f"act{j}")
        for tier in tiers:
            m.add(a >= sum(mc[j][c] * q(d["active"][tier][c]) for c in range(nc))).only_enforce_if(o[tier])
        terms.append(a)
    if full:
        for tbl, var in ((E, e), (H, h)):
            a = m.new_int_var(0, 10 * q(top) + 1, f"act_{tbl['combos'][0]}")
            for tier in tiers:
                m.add(a >= sum(var[c] * q(tbl["active"][tier][c]) for c in range(len(var)))).only_enforce_if(o[tier])
            terms.append(a)
    else:
        terms += [U * q(E["below"][c]) * e[c] for c in range(len(e))]
        terms += [U * q(H["above"][c]) * h[c] for c in range(len(h))]

    # --- device memory, KiB
    def kib(x) -> int:
        return -(-int(x) // 1024)
    sd, se, sh = sizes[1], sizes[0], sizes[-1]
    cap = int(pb.cap_bytes // 1024)
    w_gpu = (kib(sd.param_bytes) * sum(mc[j][c] for j in range(U) for c in range(nc) if d["combos"][c][0] == "gpu")
             + sum(kib(se.param_bytes) * e[c] for c in range(len(e)) if E["combos"][c][0] == "gpu")
             + sum(kib(sh.param_bytes) * h[c] for c in range(len(h)) if H["combos"][c][0] == "gpu"))
    any_dec_streamed = m.new_bool_var("dec_streamed")
    m.add(sum(mc[j][c] for j in range(U) for c in range(nc) if d["combos"][c][0] != "gpu") <= n * any_dec_streamed)
    win = m.new_int_var(0, 2 * max(kib(x.param_bytes) for x in (sd, se, sh)), "win")
    m.add(win >= 2 * kib(sd.param_bytes) * any_dec_streamed)
    m.add(win >= 2 * kib(se.param_bytes) * sum(e[c] for c in range(len(e)) if E["combos"][c][0] != "gpu"))
    m.add(win >= 2 * kib(sh.param_bytes) * sum(h[c] for c in range(len(h)) if H["combos"][c][0] != "gpu"))
    head_role = "active" if full else "above"
    head_act = sum(kib(act_bytes(sh, H["combos"][c][1], head_role)) * h[c] for c in range(len(h)))
    per_layer_state = kib(sd.params * (STATE_BYTES + GRAD_BYTES))
    trans = {tier: kib(transient_bytes(sizes, tier)) for tier in tiers}
    peak = m.new_int_var(0, 1 << 50, "peak") if min_memory else None
    lmax = m.new_int_var(1, n, "lmax")
    for j in range(U):
        m.add(lmax >= size[j])
        acts = (sum(kib(d["act_above"][c]) * mc[jj][c] for jj in range(j) for c in range(nc))
                + sum(kib(d["act_active"][c]) * mc[j][c] for c in range(nc)) + head_act)
        for tier in tiers:
            state = per_layer_state * size[j] if tier == "gpu" else 0
            if full and tier == "gpu":
                state += kib((se.params + sh.params) * (STATE_BYTES + GRAD_BYTES))
            expr = w_gpu + win + acts + state + trans[tier]
            if min_memory:
                m.add(peak >= expr).only_enforce_if(o[tier])
            else:
                m.add(expr <= cap).only_enforce_if(o[tier])

    # --- host RAM and NVMe, KiB
    def placed(tier_of, where):
        return (kib(sd.param_bytes) * sum(mc[j][c] for j in range(U) for c in range(nc) if d["combos"][c][0] == where)
                + sum(kib(se.param_bytes) * e[c] for c in range(len(e)) if E["combos"][c][0] == where)
                + sum(kib(sh.param_bytes) * h[c] for c in range(len(h)) if H["combos"][c][0] == where))
    act_cpu = (sum(kib(sd.saved_bytes) * mc[j][c] for j in range(U) for c in range(nc) if d["combos"][c][1] == "cpu")
               + sum(kib(sh.saved_bytes) * h[c] for c in range(len(h)) if H["combos"][c][1] == "cpu"))
    trained = n * sd.params + ((se.params + sh.params) if full else 0)
    extra = (se.params + sh.params) if full else 0
    keep_all = kib(trained * STATE_BYTES)
    host_cap = int(hw.host.ram_gib * GIB * HOST_RAM_USABLE // 1024)
    staging = 2 * max(kib(x.param_bytes) for x in (sd, se, sh)) if nvme else 0
    host = placed(None, "cpu") + act_cpu + staging + (keep_all if pb.switch_state == "keep_cpu" else 0)
    for tier in tiers:
        per = {"gpu": 0, "cpu": STATE_BYTES + 4, "nvme": 4}[tier]  # fp32 gradient accumulation on the host
        m.add(host + kib(sd.params * per) * lmax + kib(extra * per) <= host_cap).only_enforce_if(o[tier])
    if nvme:
        nv_cap = int(hw.host.nvme_gib * GIB * NVME_USABLE // 1024)
        nv = placed(None, "nvme") + (keep_all if pb.switch_state == "keep_nvme" else 0)
        m.add(nv + kib(sd.params * STATE_BYTES) * lmax + kib(extra * STATE_BYTES) <= nv_cap).only_enforce_if(o["nvme"])
        m.add(nv <= nv_cap)

    m.minimize(peak if min_memory else sum(terms))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 1
    solver.parameters.linearization_level = 2
    t0 = time.perf_counter()
    status = solver.solve(m)
    took = time.perf_counter() - t0
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    tier = next(x for x in tiers if solver.value(o[x]))
    # Blocks are numbered from the top; layers are laid out bottom-up, each block's combos in sorted order.
    per_block = [[c for c in range(nc) for _ in range(solver.value(mc[j][c]))] for j in reversed(range(U))]
    pls = [_placement(0, E["combos"][next(c for c in range(len(e)) if solver.value(e[c]))], tier)]
    starts, i = [], 1
    for blk in per_block:
        starts.append(i)
        for c in blk:
            pls.append(_placement(i, d["combos"][c], tier))
            i += 1
    pls.append(_placement(i, H["combos"][next(c for c in range(len(h)) if solver.value(h[c]))], tier))
    scale = 1024 if min_memory else unit
    return Solution(status=solver.status_name(status), objective_s=solver.objective_value * scale,
                    bound_s=solver.best_objective_bound * scale, solve_seconds=took,
                    starts=(0,) if full else tuple(starts), placements=tuple(pls),
                    window_bytes=solver.value(win) * 1024, state_tier=tier)
