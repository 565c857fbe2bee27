"""The ILP against exhaustive enumeration: every block partition, every placement of every layer, every state
tier and micro-batch, priced by the same cost model, on instances small enough to enumerate.

The enumeration below is written from the model's definition (planner/ilp.py's docstring), per layer and per
phase, not from the count formulation the ILP uses; it shares only the time-pricing primitives. Device bytes are
counted here from the layer sizes (activation_bytes, transient_bytes below), not with the ILP's helpers, and the
ILP's chosen solution is checked to fit twice: by that count and by the schedule's memory replay."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from planner import ilp
from planner.bounds import resource_bound
from planner.costs import layer_sizes
from planner.hardware import GIB, make_hardware
from planner.memory import STATE_BYTES
from planner.models import CATALOG, ModelConfig
from planner.planning import Request, _assemble, _problem, candidates, make_plan, search
from planner.profile import profile_model
from planner.schedule import build_schedule, memory_timeline

CFG = ModelConfig(name="t3", hidden=64, layers=3, heads=4, kv_heads=2, ffn=176, vocab=256, max_seq=512)
CFG2 = ModelConfig(name="t2", hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, vocab=256, max_seq=512)
# a vocabulary whose embedding and head outweigh a decoder layer (65k parameters each against 50k), as 128k x 4096
# does against a 7B layer: where they train decides what fits
CFG3V = ModelConfig(name="t3v", hidden=64, layers=3, heads=4, kv_heads=2, ffn=176, vocab=1024, max_seq=512)


def kib(x) -> int:
    return -(-int(x) // 1024)


def activation_bytes(sz, act: str, role: str) -> int:
    """Device bytes a layer holds for backward during a phase, from the model's definition: nothing below the
    block (forward only); what it saves (trainable sizes in the block, frozen sizes above it) when kept on the
    device; nothing when offloaded; its input checkpoint, the size of its output, when recomputed."""
    if role == "below" or act == "cpu":
        return 0
    if act == "recompute":
        return sz.out_bytes
    return sz.saved_bytes if role == "active" else sz.saved_frozen_bytes


def transient_bytes(sizes, tier: str) -> int:
    """The ILP's reserve for short-lived bytes, as its docstring defines it: the largest kernel workspace, two
    decoder layers' saved sets in flight, one optimizer temporary (fp32 master of the largest layer on the device,
    else two bf16 gradient copies of it) and two hidden states."""
    largest = sorted(sizes, key=lambda s: s.params)[-1]
    return (max(s.workspace_bytes for s in sizes)
            + 2 * max([s.saved_bytes for s in sizes if s.kind == "decoder"] or [0])
            + (4 * largest.params if tier == "gpu" else 2 * largest.param_bytes)
            + 2 * max(s.out_bytes for s in sizes))


def device_kib(sizes, starts, combos_, tier: str, full: bool, te: bool = False, tied: bool = False) -> int:
    """KiB the worst phase needs (each term rounded up to KiB, as the ILP counts): resident weights, a window of
    two of the largest streamed layer, every layer's activations in its role (the head's included), the
    transient reserve, and with the state on the device the trained layers' fp32 state and bf16 gradients.
    te: the embedding and the head are in blocks (the last ends at the head); tied: in the embedding's phase a
    tied head saves what a trained layer saves and holds its gradient of the matrix (bf16) on the device."""
    n = len(sizes) - 2
    w = [c[0] for c in combos_]
    resident = sum(kib(sizes[i].param_bytes) for i in range(n + 2) if w[i] == "gpu")
    streamed = [kib(sizes[i].param_bytes) for i in range(n + 2) if w[i] != "gpu"]
    window = 2 * max(streamed) if streamed else 0
    bounds = list(starts) + [n + 2 if te else n + 1]
    need = 0
    for first, end in zip(bounds, bounds[1:]):
        trained = range(n + 2) if full else range(first, end)
        acts = 0
        for i in range(n + 2):
            role = "active" if full or first <= i < end else "below" if i < first else "above"
            if tied and i == n + 1 and first == 0 and role == "above":
                role = "active"
                acts += kib(sizes[i].param_bytes)
            acts += kib(activation_bytes(sizes[i], combos_[i][1], role))
        state = sum(kib(sizes[i].params * 12 + sizes[i].param_bytes) for i in trained) if tier == "gpu" else 0
        need = max(need, resident + window + acts + kib(transient_bytes(sizes, tier)) + state)
    return need


def configurations(prof, hw, req: Request):
    """Every (cost per optimizer step in seconds, device KiB needed by the worst phase, micro-batch, starts,
    combos, tier) whose host RAM and NVMe needs fit, by brute force over partitions and placements."""
    nvme = hw.host.nvme_gib > 0
    full = req.method == "full"
    te = req.train_embeddings and not full   # the embedding and the head in blocks: joined or alone
    tied = te and prof.model.tie_embeddings  # the head forms the matrix's gradient in the embedding's phase
    n = prof.n_decoder
    tiers = ["gpu", "cpu"] + (["nvme"] if nvme else [])
    out = []
    for mb in candidates(req):
        g = req.batch // mb
        sizes = [layer_sizes(lp, mb, req.seq_len) for lp in prof.layers]
        se, sd, sh = sizes[0], sizes[1], sizes[-1]
        cd, ce, ch = ilp.combos("decoder", tiers), ilp.combos("embedding", tiers), ilp.combos("head", tiers)
        memo = {}

        def price(i, combo, role, tier, sizes=sizes, memo=memo, g=g):
            key = (sizes[i].kind, combo, role, tier)
            if key not in memo:
                pl = ilp._placement(i, combo, "gpu" if role == "tied" else tier)
                c = ilp.layer_cost(sizes[i], pl, "active" if role == "tied" else role, hw)  # tied: no step
                if role == "active":
                    c += (ilp.step_cost(sizes[i], pl, hw) / g
                          + ilp.switch_cost(sizes[i], tier, req.switch_state, hw) / (g * req.steps_per_block))
                memo[key] = c
            return memo[key]
        parts = [(1,)] if full else [
            (1,) + tuple(k + 1 for k, cut in enumerate(cuts, start=1) if cut)
            for cuts in itertools.product([0, 1], repeat=n - 1)]
        if te:  # the embedding's block starts at 0 (alone: 0, 1, ...); the head joins the top one or is alone
            parts = [(0,) + p[own_e:] + ((n + 1,) if own_h else ()) for p in parts
                     for own_e in (0, 1) for own_h in (0, 1)]
        for tier, starts, e, h, dec in itertools.product(tiers, parts, ce, ch, itertools.product(cd, repeat=n)):
            if req.switch_state == "keep_nvme" and not nvme:
                continue
            combos_ = (e,) + dec + (h,)
            bounds = list(starts) + [n + 2 if te else n + 1]
            blocks = list(zip(bounds, bounds[1:]))
            cost = 0.0
            for first, end in blocks:           # one phase per block
                for i in range(n + 2):
                    role = "active" if full or first <= i < end else "below" if i < first else "above"
                    if tied and i == n + 1 and first == 0 and role == "above":
                        role = "tied"
                    cost += price(i, combos_[i], role, tier)
            need = device_kib(sizes, starts, combos_, tier, full, te, tied)
            w = [c[0] for c in combos_]
            extra = (se.params + sh.params) if full else 0
            keep_all = kib((n * sd.params + (se.params + sh.params if full or te else 0)) * STATE_BYTES)

            def largest(layer_kib, blocks=blocks, sizes=sizes, sd=sd):  # KiB of the block holding the most
                if full:
                    return layer_kib(sd) * n
                return max(sum(layer_kib(sizes[i]) for i in range(a, b)) for a, b in blocks)

            def layer_host(x, tier=tier):
                """A trained layer's host bytes for the phase, its weights on the costliest tier: state on the
                host (12 B) and the fp32 gradient accumulator (4 B); a device state keeps a host copy of the new
                weights bound for NVMe."""
                if tier == "gpu":
                    return x.param_bytes if nvme else 0
                return x.params * ((STATE_BYTES if tier == "cpu" else 0) + 4)
            # the host optimizer's window over the largest trained layer: two NVMe states, the CPU AdamW's
            # sqrt(v), one pinned gradient staging buffer and two layers' new bf16 weights; one NVMe weights read
            big = max([sd, se, sh] if full or te else [sd], key=lambda x: x.params)
            window = ((big.param_bytes if nvme else 0) + (2 * STATE_BYTES * big.params if tier == "nvme" else 0)
                      + (4 * big.params + 3 * big.param_bytes if tier != "gpu" else 0))
            host = (sum(kib(sizes[i].param_bytes) for i in range(n + 2) if w[i] == "cpu")
                    + kib(sd.saved_bytes) * sum(1 for c in dec if c[1] == "cpu")
                    + (kib(sh.saved_bytes) if h[1] == "cpu" else 0)
                    + (kib(2 * max(x.param_bytes for x in (sd, se, sh))) if nvme else 0)
                    + (keep_all if req.switch_state == "keep_cpu" else 0)
                    + largest(lambda x: kib(layer_host(x)))
                    + kib(sum(layer_host(x) for x in ([se, sh] if full else [])))
                    + kib(window))
            if host > int(hw.host.ram_gib * GIB * 0.85) // 1024:   # 15% kept for the OS and page cache
                continue
            if nvme:
                nv = sum(kib(sizes[i].param_bytes) for i in range(n + 2) if w[i] == "nvme")
                nv += keep_all if req.switch_state == "keep_nvme" else 0
                if tier == "nvme":
                    nv += largest(lambda x: kib(x.params * STATE_BYTES)) + kib(extra * STATE_BYTES)
                if nv > int(hw.host.nvme_gib * GIB * 0.95) // 1024:
                    continue
            out.append((cost * g, need, mb, tuple(starts), combos_, tier))
    return out


def tokens_per_s(config, req: Request) -> float:
    """Training throughput of a configuration, from its definition: a cycle trains each of its U blocks
    steps_per_block steps of batch x seq tokens and lasts steps_per_block x (cost per step of every phase)."""
    cost_per_step, blocks = config[0], len(config[3])
    cycle_s = req.steps_per_block * cost_per_step
    return req.batch * req.seq_len * req.steps_per_block * blocks / cycle_s


def best_under(configs, cap: int, req: Request | None = None, objective: str = "cycle"):
    """The best configuration that fits: the shortest cycle, or the most tokens per second."""
    fits = [c for c in configs if c[1] <= cap // 1024]
    if not fits:
        return None
    return min(fits) if objective == "cycle" else max(fits, key=lambda c: tokens_per_s(c, req))


@pytest.fixture(scope="module")
def prof():
    return profile_model(CFG)


@pytest.fixture(scope="module")
def prof2():
    return profile_model(CFG2)


CASES = [  # (hardware overrides, request overrides, model): slow links make placement matter
    (dict(pcie_gbps=0.05), dict(method="bcd"), "t3"),
    (dict(pcie_gbps=2.0, cpu_adam_params_per_s=1e6), dict(method="bcd", switch_state="keep_cpu"), "t3"),
    (dict(pcie_gbps=0.05, nvme_gib=1.0, nvme_read_gbps=0.02), dict(method="bcd"), "t2"),
    (dict(pcie_gbps=0.5), dict(method="full"), "t3"),
    # a slow CPU optimizer and link: the state wants the device, as long as it fits
    (dict(pcie_gbps=0.05, cpu_adam_params_per_s=1e4), dict(method="bcd"), "t3"),
    # pretraining: the embedding and the head trained, joined to a decoder block or alone. No host RAM to speak
    # of keeps the state on the device, and the optimum moves from (embedding | L1 | L2 | L3 | head) at the
    # smallest budget to (embedding+L1-L2 | L3+head) as it grows (default links: the ILP rounds its costs to
    # 1/2000 of the dearest pass, which a 0.05 GB/s link would make coarse for these all-resident optima)
    (dict(host_ram_gib=0.0005), dict(method="bcd", train_embeddings=True), "t3v"),
    # the same, tied: the head forms the matrix's weight gradient in the embedding's phase (priced, held)
    (dict(host_ram_gib=0.0005), dict(method="bcd", train_embeddings=True), "t3vt"),
    (dict(pcie_gbps=0.05, nvme_gib=1.0, nvme_read_gbps=0.02), dict(method="bcd", train_embeddings=True,
                                                                   switch_state="keep_cpu"), "t2"),
]
PRETRAIN = 5   # CASES' first pretraining case
_CONFIGS: dict = {}


@pytest.mark.parametrize("objective", ["tokens", "cycle"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("slack", [1.0, 1.15, 1.6])
def test_ilp_matches_enumeration(prof, prof2, case, slack, objective):
    hw_kw, req_kw, model = CASES[case]
    p = {"t3": prof, "t2": prof2}.get(model) or _profile_t3v(tied=model == "t3vt")
    hw = make_hardware(gpu="rtx4090", **hw_kw)
    # a work budget far beyond what these instances need: the search must prove its answer (gap 0)
    req = Request(seq_len=64, batch=2, steps_per_block=3, time_limit_s=60, work_limit=100, objective=objective,
                  **req_kw)
    if case not in _CONFIGS:
        _CONFIGS[case] = configurations(p, hw, req)
    configs = _CONFIGS[case]
    cap = int(min(c[1] for c in configs) * 1024 * slack)   # from the smallest feasible budget up
    brute = best_under(configs, cap, req, objective)
    found = search(p, hw, req, cap)
    assert brute is not None and found is not None
    g = req.batch // found.micro_batch
    ilp_cost = found.solution.objective_s * g
    assert found.blocks == len(found.solution.starts)
    # The ILP rounds costs to 1/2000 of the dearest layer pass; its optimum is the true one within that.
    if objective == "cycle":
        assert ilp_cost == pytest.approx(brute[0], rel=2e-3)
    else:
        ilp_rate = req.batch * req.seq_len * found.blocks / ilp_cost
        assert ilp_rate == pytest.approx(tokens_per_s(brute, req), rel=2e-3)
    assert found.bound_s == pytest.approx(found.score_s, rel=1e-9)  # proven: gap 0
    assert not found.wall_capped
    _assert_fits(p, hw, req, found, cap)
    if req.train_embeddings:  # the embedding's block starts at layer 0 and the head's ends at n + 1
        assert found.solution.starts[0] == 0 and len(found.solution.placements) == p.n_decoder + 2


def _profile_t3v(tied: bool = False):
    key = "t3vt" if tied else "t3v"
    if key not in _CONFIGS:
        _CONFIGS[key] = profile_model(dataclasses.replace(CFG3V, name=key, tie_embeddings=tied))
    return _CONFIGS[key]


def test_pretraining_enumeration_is_not_trivial():
    """The pretraining instance's optimum changes shape with the budget: own blocks for the embedding and the
    head at the tightest budget, joined ones at a larger, so both branches of the ILP are compared."""
    hw_kw, req_kw, _ = CASES[PRETRAIN]
    configs = _CONFIGS.get(PRETRAIN) or configurations(_profile_t3v(), make_hardware(gpu="rtx4090", **hw_kw),
                                                       Request(seq_len=64, batch=2, steps_per_block=3, **req_kw))
    _CONFIGS[PRETRAIN] = configs
    lo = min(c[1] for c in configs) * 1024
    tight, roomy = best_under(configs, lo), best_under(configs, int(lo * 1.6))
    assert tight[3][:2] == (0, 1) and tight[3][-1] == CFG3V.layers + 1   # embedding and head alone
    assert tight[3] != roomy[3] and roomy[3][-1] != CFG3V.layers + 1


@pytest.mark.parametrize("case", [0, 4])
def test_ilp_just_below_each_tiers_smallest_budget(prof, prof2, case):
    """Budgets 1 KiB under the smallest that lets the optimizer state live on each tier: a term the ILP forgot
    for that tier (the device state's gradients, say) would let it pick the tier where it does not fit."""
    hw_kw, req_kw, model = CASES[case]
    p = prof if model == "t3" else prof2
    hw = make_hardware(gpu="rtx4090", **hw_kw)
    req = Request(seq_len=64, batch=2, steps_per_block=3, time_limit_s=60, work_limit=100, objective="cycle",
                  **req_kw)
    if case not in _CONFIGS:
        _CONFIGS[case] = configurations(p, hw, req)
    configs = _CONFIGS[case]
    checked = 0
    for tier in {c[5] for c in configs}:
        cap = (min(c[1] for c in configs if c[5] == tier) - 1) * 1024
        brute = best_under(configs, cap)
        if brute is None:
            continue
        found = search(p, hw, req, cap)
        assert found is not None and found.solution.placements[1].master != tier
        assert found.solution.objective_s * (req.batch // found.micro_batch) == pytest.approx(brute[0], rel=2e-3)
        _assert_fits(p, hw, req, found, cap)
        checked += 1
    assert checked


def _assert_fits(prof, hw, req, found, cap: int) -> None:
    """What the ILP chose fits `cap`: by this file's own byte count, and by the schedule's memory replay."""
    sol, mb = found.solution, found.micro_batch
    sizes = [layer_sizes(lp, mb, req.seq_len) for lp in prof.layers]
    combos_ = tuple((p.weights, p.activations) for p in sol.placements)
    tier = sol.placements[1].master
    te = req.train_embeddings and req.method != "full"
    need = device_kib(sizes, sol.starts, combos_, tier, req.method == "full", te, te and prof.model.tie_embeddings)
    assert need <= cap // 1024, (need, cap // 1024, sol.starts, combos_, tier)
    plan = _assemble(prof, hw, req, cap, 0, found)
    for ph in build_schedule(plan, prof).phases:
        peak, _, _ = memory_timeline(ph)
        assert peak <= cap, (ph.block, peak, cap)


def test_enumeration_is_not_trivial(prof):
    """The instances must trade things off: at the tightest budget the unconstrained optimum does not fit."""
    hw = make_hardware(gpu="rtx4090", pcie_gbps=0.05)
    configs = configurations(prof, hw, Request(seq_len=64, batch=2, steps_per_block=3))
    tight = best_under(configs, min(c[1] for c in configs) * 1024)
    loose = min(configs)
    assert tight[0] > loose[0] * 1.01
    assert (tight[3], tight[4]) != (loose[3], loose[4])
    # and the two objectives disagree: the most tokens/s comes from more blocks than the shortest cycle
    req = Request(seq_len=64, batch=2, steps_per_block=3)
    fastest = best_under(configs, 1 << 60, req, "tokens")
    assert len(fastest[3]) > len(loose[3])
    assert tokens_per_s(fastest, req) > 1.2 * tokens_per_s(loose, req)


def test_infeasible_budget_names_smallest_feasible(prof):
    """The error's smallest feasible budget is right: a plan at that budget exists, and 3% less has none."""
    import re

    from planner.errors import UserError
    req = Request(seq_len=64, batch=2, micro_batch=1, reserve_gib=1e-5)
    with pytest.raises(UserError, match=r"smallest budget that is feasible here is [0-9.]+ GiB") as e:
        make_plan(CFG, make_hardware(gpu="rtx4090", vram_gib=1e-4), req, profile=prof)
    assert "--seq" in str(e.value) or "NVMe" in str(e.value)
    need = float(re.search(r"feasible here is ([0-9.]+) GiB", str(e.value)).group(1))
    make_plan(CFG, make_hardware(gpu="rtx4090", vram_gib=need * 1.001), req, profile=prof)
    with pytest.raises(UserError):
        make_plan(CFG, make_hardware(gpu="rtx4090", vram_gib=need * 0.97), req, profile=prof)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("slack", [1.0, 1.15, 1.6])
def test_resource_bound_is_below_every_enumerated_optimum(prof, prof2, case, slack):
    """bounds.resource_bound, which the search prunes with, never exceeds the cheapest configuration that fits
    for its micro-batch, state tier and number of decoder blocks (any embedding / head layout), by enumeration."""
    hw_kw, req_kw, model = CASES[case]
    p = {"t3": prof, "t2": prof2}.get(model) or _profile_t3v(tied=model == "t3vt")
    hw = make_hardware(gpu="rtx4090", **hw_kw)
    req = Request(seq_len=64, batch=2, steps_per_block=3, **req_kw)
    if case not in _CONFIGS:
        _CONFIGS[case] = configurations(p, hw, req)
    configs = _CONFIGS[case]
    cap = int(min(c[1] for c in configs) * 1024 * slack)
    n = p.n_decoder
    cheapest = {}
    for cost, need, mb, starts, _, tier in configs:
        if need > cap // 1024:
            continue
        own_e = req.train_embeddings and len(starts) > 1 and starts[1] == 1   # the embedding's block alone
        own_h = req.train_embeddings and starts[-1] == n + 1
        key = (mb, tier, len(starts) - own_e - own_h)
        cheapest[key] = min(cheapest.get(key, float("inf")), cost)
    assert cheapest
    for (mb, tier, blocks), cost in cheapest.items():
        pb = _problem(p, hw, req, mb, cap)
        assert resource_bound(pb, blocks, tier) * (req.batch // mb) <= cost * (1 + 1e-9), (mb, tier, blocks)


def test_resource_bound_prices_what_the_cheap_bound_leaves_out():
    """7B at micro-batch 8 on a 24 GiB card: 2 GiB of saved activations per layer cannot stay on the device, and
    offloading them all would take more than the 54 GiB of usable host RAM, so layers recompute. ilp.lower_bound
    gives every layer its cheapest placement; the resource bound prices the memory and lands within a few
    percent under the ILP's proven optimum."""
    prof7 = profile_model(CATALOG["7b"])
    hw = make_hardware(gpu="rtx4090", vram_gib=24)
    req = Request()
    pb = _problem(prof7, hw, req, 8, int(22.5 * GIB))
    sol = ilp.solve(pb, 18, "gpu", work_limit=20)
    assert sol.status == "OPTIMAL"
    cheap, tight = ilp.lower_bound(pb, 18, "gpu"), resource_bound(pb, 18, "gpu")
    assert tight <= sol.objective_s * (1 + 2e-3)   # the ILP's costs are rounded to 1/2000 of the dearest pass
    assert cheap < 0.9 * sol.objective_s and tight > 0.93 * sol.objective_s
