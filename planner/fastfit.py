"""What fits: the fast planner's memory checks (planner.fastplan), with the ILP's byte rules (planner.memory).

A policy (`Policy`) cuts the decoder layers into bottom-heavy blocks (`spans`), keeps the top k layers' weights
resident and the top a layers' activations on the device (`segments`); `fit` finds the largest k and a that
device memory allows, serving weights or activations first, and checks the node's host RAM.

Memory is checked in the phases that can be the worst (`phase_bytes`): the bottom block's (the largest, with
every other layer above it), the block holding the lowest kept-activation layer and the block above that (a
block whose layers all keep activations holds trainable-size saved sets, larger than the frozen-size ones the
bottom phase holds for them). Every other phase holds no more than one of these, so a fit costs O(1) and
depends on the block count only through the bottom block's size; the cycle is priced in closed form.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planner import memory
from planner.memory import STATE_BYTES, Tier, shard_params

if TYPE_CHECKING:
    from planner.fastplan import _Tables


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


def spans(n: int, u: int, bottom: int = 0) -> tuple[list[tuple[int, int]], list[int], list[int]]:
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


def overlap(a: int, b: int, c: int, d: int) -> int:
    return max(0, min(b, d) - max(a, c) + 1)


def segments(n: int, k: int, a: int, act: str) -> list[tuple[int, int, str, str]]:
    """(first, last, weights, activations) runs of decoder layers bottom-up: the top k resident, the top a
    keeping their activations on the device, the rest streamed and `act`."""
    lw, la = n - k + 1, n - a + 1
    lo, hi = min(lw, la), max(lw, la)
    mid = ("gpu", act) if lw < la else ("cpu", "gpu")
    return [seg for seg in ((1, lo - 1, "cpu", act), (lo, hi - 1) + mid, (hi, n, "gpu", "gpu")) if seg[1] >= seg[0]]


def phase_bytes(t: _Tables, p: Policy, a: int, full: bool, every: bool = True) -> int:
    """The most device bytes of activations, trained state and offload backlog that a phase holds with the top
    `a` decoder layers keeping their activations (module docstring: which phases can be the worst); with
    `every` False, the bottom block's phase only (a lower bound that depends on the bottom block's size alone)."""
    n = len(t.sizes) - 2
    cut, firsts, _ = spans(n, 1 if full else p.blocks, 0 if full else p.bottom)
    o, sb, ac = p.act, t.state_bytes[p.state], t.act
    js = {0}
    if a and every:
        j = bisect_right(firsts, n - a + 1) - 1   # the block holding the lowest kept layer
        js |= {j, min(j + 1, len(cut) - 1)}
    worst = 0
    for j in js:
        first, last = cut[j]
        g_in = overlap(first, last, n - a + 1, n)
        o_in = last - first + 1 - g_in
        g_up = min(a, n - last)
        o_up = n - last - g_up
        b = (o_in * ac[(o, "active")] + g_in * ac[("gpu", "active")] + o_up * ac[(o, "above")]
             + g_up * ac[("gpu", "above")] + (last - first + 1) * sb)
        if o == "cpu":
            b += int(t.backlog * (o_in * t.sizes[1].saved_bytes + o_up * t.sizes[1].saved_frozen_bytes))
        worst = max(worst, b)
    return worst


def fit(t: _Tables, p: Policy, cap: int, host_cap: int, switch_state: str, ranks: int,
         order: str, every: bool = True) -> tuple[int, int, int] | None:
    """(resident decoder layers, layers keeping activations, window bytes) that fit device and host memory,
    or None: the ILP's accounting and the offload lag. `order`: what memory serves first, "weights" or "acts"
    (module docstring); "none": no layer keeps activations but with p.act "gpu", where all do. `every`: as in
    phase_bytes (False: an optimistic fit, on the bottom phase alone)."""
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
        rest = cap - base - phase_bytes(t, p, a, full, every)
        if n * pb + 2 * edge <= rest:
            return n, 2 * edge
        return min(n - 1, (rest - win_some) // pb), win_some

    def most_kept(k: int, win: int) -> int:
        """Most layers keeping activations with k resident (-1 when none fit): the bottom phase's bytes are
        linear in the count in two pieces (the layers above the bottom block, then those in it), which gives a
        first answer; a check of every phase that can be worse confirms it or bisects below it."""
        rest = cap - base - k * pb - win
        f0 = phase_bytes(t, p, 0, full, every)
        if f0 > rest:
            return -1
        lag = t.backlog if o == "cpu" else 0.0
        d_up = t.act[("gpu", "above")] - t.act[(o, "above")] - lag * sd.saved_frozen_bytes
        d_in = t.act[("gpu", "active")] - t.act[(o, "active")] - lag * sd.saved_bytes
        s0 = n if full else spans(n, p.blocks, p.bottom)[0][0][1]
        m = n - s0
        a = m if d_up <= 0 else min(m, int((rest - f0) // d_up))
        if a == m:
            a += s0 if d_in <= 0 else min(s0, int((rest - f0 - m * max(d_up, 0)) // d_in))
        if phase_bytes(t, p, a, full, every) <= rest:
            return a
        lo, hi = 0, a - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if phase_bytes(t, p, mid, full, every) <= rest else (lo, mid - 1)
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
           + host_trained(t, p.state, top, full, switch_state))
    return None if shared + ranks * own > host_cap else (k, a, win)


_HOST: dict = {}


def host_trained(t: _Tables, state: tuple[str, bool], top: int, full: bool, switch_state: str) -> int:
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
