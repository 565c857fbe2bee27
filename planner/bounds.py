"""A tighter lower bound on a subproblem's cycle cost than ilp.lower_bound, for the search to prune with.

ilp.lower_bound lets every decoder layer take its cheapest placement and only asks the device to hold the
largest block's optimizer state and the resident weights. When activations or weights cannot all stay where
they are cheapest (a 7B model at micro-batch 8 keeps 2 GB of saved activations per layer; 70B's bf16 weights
do not fit in host RAM, so some stream from NVMe) that bound is 10-25% below the optimum, and the search has
to solve every block count whose loose bound beats the best plan. This one prices the memory that forces the
dearer placements, by Lagrangian relaxation of two of the ILP's constraints:

  device, in the phase of the bottom block (the one holding the most saved activations: every layer above it
  has run its forward): the transient reserve, the prefetch window when any decoder layer streams, and per
  layer its resident bf16 weights, its saved activations (trainable size in the bottom block, frozen above it)
  and, in the bottom block, its optimizer state and gradients on the gpu tier;
  host RAM: per layer its pinned weights and its offloaded activations, beside what every plan holds there
  (the largest block's trained-layer bytes, the step's window, NVMe staging, kept state).

Every other constraint, and the embedding's and head's bytes, are dropped (a relaxation). With prices
lam_d, lam_h >= 0 per byte, a layer that is above the trained block in t phases costs at least
    f(t) = min_c (U-1) Cb(c) + t (Cab(c) - Cb(c)) + Cact(c) + lam_d dev_t(c) + lam_h host(c)
(ilp's module docstring: below in U-1-t phases, above in t, trained in one), and the cycle at least
sum_i f(t_i) - lam_d * device room - lam_h * host room, for ANY prices: that is what makes it valid, however
well the prices are chosen. Block j from the top has U-1-j blocks below it, so each t in 0..U-1 is taken by
one block's layers; with the largest block of s layers, the sum is smallest when every t gets one layer and
the n-U others go, s-1 at most per t, to the smallest f(t). The bound is the minimum over s (which also sets
the host bytes of the largest block) at the best prices a short compass search finds (the relaxation is
concave in them; `_maximise`), and never below ilp.lower_bound: the larger of the two is returned. Two cases
are bounded apart and the smaller taken, as a solution is in one of them: some decoder layer streams (the
device holds the two-layer window), or none does (only resident weights).

Every byte rule here is the ILP's (planner.memory, as ilp.solve writes it over the counts): when solve()'s
memory terms change, these must follow. tests/planner/test_ilp.py checks the bound against enumeration of
every configuration of small models, and against the ILP's proven optimum on 7B.
"""
from __future__ import annotations

import math

import numpy as np

from planner import ilp, memory
from planner.memory import Tier, transient_bytes


def resource_bound(pb: ilp.Problem, blocks: int, tier: str, *, enough: float = math.inf,
                   cheap: float | None = None, prices: dict | None = None) -> float:
    """A valid lower bound on the cycle cost of solve(pb, blocks, tier) (any `own`), at least ilp.lower_bound
    (`cheap`, when the caller has it). The search for prices stops once the bound reaches `enough` (what the
    caller needs to rule it out). `prices`: the caller's record of the prices found so far, where the next
    block count of the same problem and tier starts its search (one per planner search, so that a bound, and
    the plan, never depend on what the process computed before)."""
    cheap = ilp.lower_bound(pb, blocks, tier) if cheap is None else cheap
    if pb.method == "full" or cheap == float("inf") or pb.cluster.world > 1:
        return cheap   # clusters (sharded states, a node's host RAM shared by its ranks) keep the cheap bound
    # twice the cheap bound is enough for any use: beyond, the relaxation is usually infeasible (its prices
    # grow without end) and the search for them would walk to its reach
    enough = min(enough, 2 * cheap)
    t, tiers = ilp._costs(pb)
    d = t["decoder"]
    n = sum(1 for s in pb.sizes if s.kind == "decoder")
    u = blocks
    if u < 1 or u > n:
        return cheap
    sd, se, sh = pb.sizes[1], pb.sizes[0], pb.sizes[-1]
    w = sd.param_bytes
    state = memory.trained_layer_device_bytes(sd.params, sd.param_bytes, tier)
    transient = transient_bytes(pb.sizes, tier)
    nvme = Tier.NVME in tiers
    ends = ilp.ends_bound(pb, u, tier)
    # per combination: cost a + t*b of a layer above the block in t phases; device bytes in the bottom phase
    # above it (dev1) and in it (dev0); host bytes
    cs = d["combos"]
    a = [(u - 1) * lo + act for lo, act in zip(d["below"], d["active"][tier])]
    b = [hi - lo for hi, lo in zip(d["above"], d["below"])]
    wdev = [w if c[0] == Tier.GPU else 0 for c in cs]
    dev1 = [x + y for x, y in zip(wdev, d["act_above"])]
    dev0 = [x + y + state for x, y in zip(wdev, d["act_active"])]
    host = [(w if c[0] == Tier.CPU else 0) + (sd.saved_bytes if c[1] == Tier.CPU else 0) for c in cs]
    # host bytes every plan holds besides the layers' own (ilp.solve's host constraint, terms that do not depend
    # on the placements, the step's window at the decoder's size: at most the largest trained layer's)
    layer_host = max(memory.trained_layer_host_bytes(sd.params, sd.param_bytes, tier, x) for x in tiers)
    staging = memory.nvme_staging_bytes(2, max(x.param_bytes for x in (sd, se, sh))) if nvme else 0
    fixed_host = (staging + memory.step_host_bytes(sd.params, sd.param_bytes, tier, nvme_weights=nvme)
                  + (n * sd.params * memory.STATE_BYTES if pb.switch_state == "keep_cpu" else 0))
    host_room = memory.host_usable_bytes(pb.hw) - fixed_host
    s_lo, s_hi = -(-n // u), n - u + 1
    if state:   # the largest block's phase holds its state beside the transient reserve
        s_hi = min(s_hi, (pb.cap_bytes - transient) // state)
    if s_hi < s_lo:
        return cheap
    cases = [(pb.cap_bytes - transient - 2 * w, range(len(cs)))]   # some decoder layer streams: the window
    if n * w + transient <= pb.cap_bytes:                          # or every one is resident
        cases.append((pb.cap_bytes - transient, [i for i, c in enumerate(cs) if c[0] == Tier.GPU]))
    worst = float("inf")   # the solution lies in one of the cases: the smallest case bound holds
    for dev_room, keep in cases:
        cols = [np.array([v[i] for i in keep], dtype=float) for v in (a, b, dev0, dev1, host)]
        key = (id(pb), tier, dev_room)   # the problem itself is kept with its prices: its id cannot be reused
        prices = {} if prices is None else prices
        fn = _Relaxed(*cols, dev_room=dev_room, host_room=host_room, layer_host=layer_host, n=n, u=u,
                      s_lo=s_lo, s_hi=int(s_hi))
        scale = (max(a) * u / max(1, max(dev0 + dev1)), max(a) * u / max(1, max(host)))
        home = (math.log10(scale[0]) - 1, math.log10(scale[1]) - 1)
        hit = prices.get(key)
        warm = bool(hit and hit[0] is pb)
        value, at = _maximise(fn, hit[1] if warm else home, home, step=0.25 if warm else 1.0,
                              enough=enough - ends)
        prices[key] = (pb, at)
        worst = min(worst, value + ends)
    return max(cheap, worst)


class _Relaxed:
    """The Lagrangian relaxation at prices (lam_d, lam_h), minimised over the largest block size s."""

    def __init__(self, a, b, dev0, dev1, host, *, dev_room, host_room, layer_host, n, u, s_lo, s_hi):
        self.a, self.dev0, self.dev1, self.host = a, dev0, dev1, host
        self.rooms = (dev_room, host_room)
        self.slope = b[:, None] * np.arange(1, u, dtype=float)[None, :]   # t (Cab - Cb), t = 1 .. U-1
        s = np.arange(s_lo, s_hi + 1)
        full, rest = np.divmod(n - u, np.maximum(s - 1, 1))
        # every t takes one layer; the n-U others fill the smallest f(t) with s-1 each: `full` of them, then
        # `rest` layers in the next (prefix sums of the sorted f, index `full`)
        self.full = np.where(s > 1, full, 0)
        self.rest = np.where(s > 1, rest, 0)
        self.s1 = s - 1
        self.fill_idx = np.minimum(self.full, u - 1)
        self.s_host = s * float(layer_host)
        self.f = np.empty(u)
        self.prefix = np.zeros(u + 1)

    def __call__(self, lam_d: float, lam_h: float) -> float:
        p = self.a + lam_h * self.host
        f = self.f
        f[0] = (p + lam_d * self.dev0).min()
        (p + lam_d * self.dev1)[:, None].__add__(self.slope).min(axis=0, out=f[1:])
        base = f.sum()
        f.sort()
        np.cumsum(f, out=self.prefix[1:])
        fill = self.s1 * self.prefix[self.full] + self.rest * f[self.fill_idx]
        return float(base + (fill + lam_h * self.s_host).min() - lam_d * self.rooms[0] - lam_h * self.rooms[1])


def _maximise(fn, start: tuple[float, float], home: tuple[float, float], *,
              step: float, enough: float = math.inf) -> tuple[float, tuple[float, float]]:
    """The largest fn(lam_d, lam_h) found, and where (log10 of the prices): fn at zero prices, and a compass
    search on the logarithms of the prices from `start` (within _REACH decades of `home`), in steps of `step`
    decades down to a sixteenth of one (a quarter from a neighbouring count's prices), diagonals included (fn is
    concave and piecewise linear: along one axis alone the search would stall on its ridges). Every evaluation
    is a valid bound: the search needs to be good, not exact, and it stops at the first that reaches `enough`."""
    best = fn(0.0, 0.0)
    at = start
    here = fn(10 ** at[0], 10 ** at[1])
    while step >= 1 / 16 and max(best, here) < enough:
        moved = False
        for dx, dy in _MOVES:
            p = (at[0] + dx * step, at[1] + dy * step)
            if max(abs(p[0] - home[0]), abs(p[1] - home[1])) > _REACH:
                continue   # an infeasible relaxation grows without end: its bound is large enough by then
            v = fn(10 ** p[0], 10 ** p[1])
            if v > here:
                here, at, moved = v, p, True
                if v >= enough:
                    break
        if not moved:
            step /= 2
    return max(best, here), at


_REACH = 8   # decades the prices may move from their scale (`home`)
_MOVES = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))
