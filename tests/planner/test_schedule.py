"""planner/schedule.py: the invariants of the ops list that the runtime executes and the simulator times.

Plans come from make_plan and from forced placements (weights on cpu and nvme, activations offloaded or
recomputed, optimizer state on cpu or nvme, gradients streamed off), with their predictions refreshed by
predict(), and are checked phase by phase: issue order, memory balance, the prefetch window, roles, loads
before use, where the optimizer runs, and the plan's predicted peaks.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter, defaultdict

import pytest

from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.plan import Block, validate
from planner.planning import Request, make_plan, predict
from planner.profile import profile_model
from planner.schedule import build_schedule, memory_timeline, role

COMPUTE = ("forward", "backward", "recompute")


def _force(plan, prof, *, place=None, **fields):
    """The plan with some fields replaced and each placement passed through `place`, predictions refreshed."""
    if place is not None:
        fields["placements"] = tuple(place(p) for p in plan.placements)
    plan = dataclasses.replace(plan, **fields)
    plan = dataclasses.replace(plan, predicted=predict(plan, prof))
    validate(plan)
    return plan


def _set(**tiers):
    return lambda p: dataclasses.replace(p, **tiers)


def _state(tier):
    """fp32 master and moments on `tier`; gradients leave the device with them."""
    return dict(master=tier, moments=tier, grads="gpu" if tier == "gpu" else "cpu")


def _mixed(p):
    # every layer a different combination: weights gpu/cpu/nvme, activations cpu/recompute/gpu
    acts = "gpu" if p.layer == 0 else ("cpu", "recompute", "gpu")[p.layer % 3]
    return dataclasses.replace(p, weights=("gpu", "cpu", "nvme")[p.layer % 3], activations=acts)


@functools.cache
def _plans() -> dict:
    """Built on first use, not at collection: a planner error then fails the tests, not the collection."""
    tiny, one_b = CATALOG["tiny"], CATALOG["1b"]
    tprof, bprof = profile_model(tiny), profile_model(one_b)
    hw = make_hardware(gpu="rtx4090", vram_gib=1, nvme_gib=100)
    base = make_plan(tiny, hw, Request(seq_len=64, batch=4, micro_batch=2, steps_per_block=2, reserve_gib=0.25))
    assert base.shape.grad_accum == 2
    three = tuple(Block(first=a, last=b) for a, b in ((1, 1), (2, 3), (4, 4)))
    plans = {
        "tiny planned": (base, tprof),
        "tiny 3 blocks": (_force(base, tprof, blocks=three), tprof),
        "tiny weights cpu": (_force(base, tprof, blocks=three, place=_set(weights="cpu")), tprof),
        "tiny weights nvme, recompute": (_force(base, tprof, blocks=three,
                                                place=lambda p: dataclasses.replace(
                                                    p, weights="nvme",
                                                    activations="gpu" if p.layer == 0 else "recompute")), tprof),
        "tiny mixed tiers": (_force(base, tprof, blocks=three, place=_mixed), tprof),
        "tiny state cpu, acts cpu": (_force(base, tprof, blocks=three,
                                            place=lambda p: dataclasses.replace(
                                                p, activations="gpu" if p.layer == 0 else "cpu", **_state("cpu"))),
                                     tprof),
        "tiny state nvme, weights nvme": (_force(base, tprof, blocks=three,
                                                 place=_set(weights="nvme", **_state("nvme"))), tprof),
        "tiny state nvme, weights gpu": (_force(base, tprof, blocks=three, place=_set(**_state("nvme"))), tprof),
        "tiny one micro-batch, mixed, state cpu": (_force(base, tprof, blocks=three,
                                                          shape=dataclasses.replace(base.shape, micro_batch=4,
                                                                                    grad_accum=1),
                                                          place=lambda p: dataclasses.replace(_mixed(p),
                                                                                              **_state("cpu"))),
                                                   tprof),
        "tiny full, streamed": (_force(base, tprof, method="full", blocks=(Block(first=0, last=5),),
                                       place=_set(weights="cpu", **_state("cpu"))), tprof),
        "tiny keep_cpu switch": (_force(base, tprof, blocks=three, switch_state="keep_cpu"), tprof),
        # pretraining: the embedding and the head in blocks of their own, every tier in play
        "tiny pretraining, own blocks": (_force(base, tprof, place=_mixed, blocks=tuple(
            Block(first=a, last=b) for a, b in ((0, 0), (1, 2), (3, 4), (5, 5)))), tprof),
        "tiny pretraining planned": (make_plan(tiny, hw, Request(seq_len=64, batch=4, micro_batch=2, steps_per_block=2,
                                                                 reserve_gib=0.25, train_embeddings=True)), tprof),
    }
    big = make_plan(one_b, make_hardware(gpu="rtx4090", vram_gib=24),
                    Request(seq_len=2048, batch=8, time_limit_s=2))
    plans["1b planned"] = (big, bprof)
    quarters = tuple(Block(first=a, last=b) for a, b in ((1, 6), (7, 12), (13, 17), (18, 22)))
    plans["1b 4 blocks, nvme"] = (_force(big, bprof, blocks=quarters,
                                         hardware=make_hardware(gpu="rtx4090", vram_gib=24, nvme_gib=500),
                                         place=lambda p: dataclasses.replace(
                                             p, weights="nvme" if p.layer % 2 else "cpu",
                                             activations="gpu" if p.layer == 0 else "recompute",
                                             **_state("nvme"))), bprof)
    return plans


NAMES = ["tiny planned", "tiny 3 blocks", "tiny weights cpu", "tiny weights nvme, recompute", "tiny mixed tiers",
         "tiny state cpu, acts cpu", "tiny state nvme, weights nvme", "tiny state nvme, weights gpu",
         "tiny one micro-batch, mixed, state cpu", "tiny full, streamed", "tiny keep_cpu switch",
         "tiny pretraining, own blocks", "tiny pretraining planned", "1b planned", "1b 4 blocks, nvme"]


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    plan, prof = _plans()[request.param]
    return plan, prof, build_schedule(plan, prof)


def test_the_variants_are_what_they_claim():
    # the forced plans really exercise every tier (else the tests below would prove less than they say)
    seen = Counter()
    for plan, _ in _plans().values():
        for p in plan.placements:
            seen.update({f"weights={p.weights}", f"master={p.master}", f"grads={p.grads}",
                         f"activations={p.activations}"})
    for tier in ("weights=gpu", "weights=cpu", "weights=nvme", "master=gpu", "master=cpu", "master=nvme",
                 "grads=gpu", "grads=cpu", "activations=gpu", "activations=cpu", "activations=recompute"):
        assert seen[tier] > 0, tier
    assert _plans()["1b planned"][0].shape.seq_len == 2048
    assert list(_plans()) == NAMES


def _ancestors(ops, op) -> set[int]:
    seen, stack = set(), list(op.deps)
    while stack:
        d = stack.pop()
        if d not in seen:
            seen.add(d)
            stack.extend(ops[d].deps)
    return seen


def test_issue_order_is_topological(case):
    _, _, sched = case
    for ph in sched.phases:
        assert [op.id for op in ph.ops] == list(range(len(ph.ops)))
        for op in ph.ops:
            assert all(0 <= d < op.id for d in op.deps), op.name


def test_the_schedule_carries_every_dependency_its_consumers_need(case):
    """The runtime and the simulator act on these deps alone: a fetch reads what its offload wrote; every optimizer
    step (the first clips by the block's global gradient norm) follows every gradient of the block to the host;
    an NVMe state is read only after the state read two layers before was written back and its weights sent on
    (planner.memory counts two NVMe states in host RAM)."""
    plan, _, sched = case
    for ph in sched.phases:
        ops = ph.ops
        offload = {(op.layer, op.micro_batch): op.id for op in ops if op.kind == "offload_act"}
        grads = {op.id for op in ops if op.kind == "grad_offload"}
        for op in ops:
            if op.kind == "fetch_act":
                assert offload[(op.layer, op.micro_batch)] in _ancestors(ops, op), op.name
            if op.kind == "optimizer_step":
                assert grads <= _ancestors(ops, op), op.name
        reads = [op for op in ops if op.kind == "read_state"]
        for k, op in enumerate(reads[2:], start=2):
            before = reads[k - 2].layer
            after = {o.id for o in ops if o.layer == before and o.kind in ("write_state", "upload_weights",
                                                                              "write_weights")}
            assert after and after <= _ancestors(ops, op), op.name


def test_nothing_dynamic_leaks_from_a_step(case):
    _, _, sched = case
    for ph in sched.phases:
        live = defaultdict(int)
        for op in ph.ops:
            if op.alloc_bytes or op.free_bytes:
                assert op.mem_class in ("prefetch", "activations", "grads", "workspace"), op.name
            live[op.mem_class] += op.alloc_bytes
            live[op.mem_class] -= op.free_bytes
            assert all(v >= 0 for v in live.values()), f"{op.name}: {dict(live)}"
        assert all(v == 0 for v in live.values()), dict(live)
        _, _, trace = memory_timeline(ph)
        assert trace[-1] == sum(ph.static.values())
        assert min(trace) >= sum(ph.static.values())


def test_at_most_window_streamed_layers_resident(case):
    plan, _, sched = case
    streamed = any(p.weights != "gpu" for p in plan.placements)
    assert (sched.window_layers >= 2) == streamed
    for ph in sched.phases:
        resident = set()
        for op in ph.ops:
            if op.kind == "load_weights":
                resident.add(op.name.split(" ", 1)[1])
                assert len(resident) <= sched.window_layers, op.name
            elif op.kind == "evict":
                resident.remove(op.name.split(" ", 1)[1])
        assert not resident


def _streamed_uses(ph):
    """(load op, compute op) per streamed layer pass, in issue order."""
    by_name = {op.name: op for op in ph.ops}
    uses = []
    for op in ph.ops:
        if op.kind == "load_weights":
            _, tag_l, tag_mb, pass_ = op.name.split()
            uses.append((op, by_name[f"{pass_} {tag_l} {tag_mb}"]))
    return uses



def test_a_window_of_two_loads_the_next_layer_while_this_one_computes():
    plan, prof = _plans()["tiny weights cpu"]
    sched = build_schedule(plan, prof)
    assert sched.window_layers == 2
    for ph in sched.phases:
        uses = _streamed_uses(ph)
        for (load, _), (_, previous) in zip(uses[1:], uses):
            assert previous.id not in _ancestors(ph.ops, load), load.name
        resident = peak = 0
        for op in ph.ops:
            resident += (op.kind == "load_weights") - (op.kind == "evict")
            peak = max(peak, resident)
        assert peak == 2


def test_roles_decide_backward(case):
    plan, _, sched = case
    g = plan.shape.grad_accum
    for ph in sched.phases:
        bl = plan.blocks[ph.block]
        assert ph.layers == tuple(bl.layers)
        fwd = Counter(op.layer for op in ph.ops if op.kind == "forward")
        bwd = [op for op in ph.ops if op.kind == "backward"]
        assert fwd == {i: g for i in range(plan.n_layers)}
        assert Counter(op.layer for op in bwd) == {i: g for i in range(bl.first, plan.n_layers)}
        for op in bwd:
            sz = sched.sizes[op.layer]
            r = role(plan, ph.block, op.layer)
            assert r != "below"
            assert op.flops == (sz.bwd_flops if r == "active" else sz.bwd_input_flops), op.name
        assert all(op.layer >= bl.first for op in ph.ops if op.kind in ("recompute", "fetch_act", "grad_offload"))
        # only the block's gradients leave the device
        assert {op.layer for op in ph.ops if op.kind == "grad_offload"} <= set(bl.layers)


def test_offloaded_weights_are_loaded_before_every_use(case):
    plan, _, sched = case
    for ph in sched.phases:
        index = {op.name: op for op in ph.ops}
        for op in ph.ops:
            if op.kind not in COMPUTE:
                continue
            where = plan.placement(op.layer).weights
            pass_ = "fwd" if op.kind == "forward" else "bwd"
            tag = f"L{op.layer} mb{op.micro_batch} {pass_}"
            if where == "gpu":
                assert f"load {tag}" not in index
                continue
            load, evict = index[f"load {tag}"], index[f"evict {tag}"]
            assert load.id < op.id < evict.id and load.id in _ancestors(ph.ops, op), op.name
            assert load.tier == where and load.bytes == sched.sizes[op.layer].param_bytes
            if where == "nvme":
                read = index[f"read {tag}"]
                assert read.id < load.id and read.id in load.deps
            else:
                assert f"read {tag}" not in index


def test_optimizer_runs_where_its_state_lives(case):
    plan, _, sched = case
    for ph in sched.phases:
        bl = plan.blocks[ph.block]
        steps = {op.layer: op for op in ph.ops if op.kind == "optimizer_step"}
        assert set(steps) == set(bl.layers)
        for i, step in steps.items():
            tier = plan.placement(i).master
            assert step.stream == ("compute" if tier == "gpu" else "cpu_opt") and step.tier == tier
            assert step.params == sched.sizes[i].params
            reads = [op for op in ph.ops if op.kind == "read_state" and op.layer == i]
            writes = [op for op in ph.ops if op.kind == "write_state" and op.layer == i]
            if tier == "nvme":
                assert len(reads) == len(writes) == 1
                assert reads[0].id in step.deps and step.id in writes[0].deps
            else:
                assert reads == writes == []
            # the step comes after every backward of its layer
            bwd = [op.id for op in ph.ops if op.kind == "backward" and op.layer == i]
            assert len(bwd) == plan.shape.grad_accum and set(bwd) <= _ancestors(ph.ops, step)



def test_cpu_optimizer_waits_for_the_gradients_it_reads():
    plan, prof = _plans()["tiny state cpu, acts cpu"]
    for ph in build_schedule(plan, prof).phases:
        for step in (op for op in ph.ops if op.kind == "optimizer_step"):
            grads = [op.id for op in ph.ops if op.kind == "grad_offload" and op.layer == step.layer]
            assert grads and set(grads) <= _ancestors(ph.ops, step), step.name



def test_activations_are_fetched_after_they_were_offloaded():
    plan, prof = _plans()["tiny state cpu, acts cpu"]
    for ph in build_schedule(plan, prof).phases:
        index = {op.name: op for op in ph.ops}
        fetches = [op for op in ph.ops if op.kind == "fetch_act"]
        assert fetches
        for fetch in fetches:
            offload = index["offload " + fetch.name.split(" ", 1)[1]]
            assert offload.id in _ancestors(ph.ops, fetch), fetch.name


def replay_peak(ph) -> int:
    """A second, plainer replay of a phase's device bytes, written from the schedule's contract rather than from
    memory_timeline: op k holds the static bytes, every allocation of ops 0..k and its own transient bytes, less
    what earlier ops freed. An op frees when it ends, except a copy off the device (d2h), whose source is freed
    only when the first op that waits for it starts (or never, within the step, if none does)."""
    first_waiter: dict[int, int] = {}
    for k, op in enumerate(ph.ops):
        for d in op.deps:
            first_waiter.setdefault(d, k)
    freed_from = [0] * (len(ph.ops) + 1)   # bytes whose release takes effect at op k
    for k, op in enumerate(ph.ops):
        if op.free_bytes:
            at = first_waiter.get(op.id, len(ph.ops)) if op.stream == "d2h" else k + 1
            freed_from[at] += op.free_bytes
    live, peak = sum(ph.static.values()), 0
    for k, op in enumerate(ph.ops):
        live += op.alloc_bytes - freed_from[k]
        peak = max(peak, live + op.transient_bytes)
    return peak


def test_replay_of_a_hand_built_phase():
    """static 1000; load +100; fwd +10 with 50 transient (peak 1160); offload frees 10 only when bwd, which waits
    for it, starts; bwd +20 with 5 transient: 1000 + 100 + 10 - 10 + 20 + 5 = 1125; the evict frees 100."""
    from planner.schedule import Op, PhaseSchedule
    ops = (Op(id=0, name="load", kind="load_weights", stream="h2d", layer=1, alloc_bytes=100, mem_class="prefetch"),
           Op(id=1, name="fwd", kind="forward", stream="compute", layer=1, alloc_bytes=10, transient_bytes=50,
              mem_class="activations", deps=(0,)),
           Op(id=2, name="offload", kind="offload_act", stream="d2h", layer=1, free_bytes=10,
              mem_class="activations", deps=(1,)),
           Op(id=3, name="bwd", kind="backward", stream="compute", layer=1, alloc_bytes=20, transient_bytes=5,
              mem_class="activations", deps=(2,)),
           Op(id=4, name="evict", kind="evict", stream="compute", layer=1, free_bytes=100, mem_class="prefetch",
              deps=(3,)))
    ph = PhaseSchedule(block=0, layers=(1,), static={"weights": 1000}, ops=ops)
    peak, breakdown, trace = memory_timeline(ph)
    assert peak == replay_peak(ph) == 1160
    assert trace == [1100, 1110, 1110, 1120, 1020]
    assert breakdown == {"weights": 1000, "prefetch": 100, "activations": 10, "grads": 0, "workspace": 50}


def test_predicted_peaks_are_the_replay(case):
    plan, _, sched = case
    assert len(plan.predicted.phases) == len(sched.phases)
    for pred, ph in zip(plan.predicted.phases, sched.phases):
        peak, breakdown, trace = memory_timeline(ph)
        assert pred.block == ph.block and pred.peak_vram_bytes == replay_peak(ph) == peak
        assert sum(breakdown.values()) == peak >= max(trace)


@pytest.mark.parametrize("name", ["tiny planned", "tiny pretraining planned", "1b planned"])
def test_make_plan_peaks_fit_the_budget(name):
    plan, _ = _plans()[name]
    assert plan.predicted.peak_vram_bytes <= plan.budget_bytes - plan.reserve_bytes


def test_switch_ops_follow_the_policy():
    for name, (plan, prof) in _plans().items():
        for ph in build_schedule(plan, prof).phases:
            if plan.switch_state == "reset":
                assert ph.switch_ops == (), name
            else:
                layers = [i for i in ph.layers if plan.placement(i).master != "cpu"]
                assert [(op.kind, op.layer) for op in ph.switch_ops] == \
                    [(k, i) for i in layers for k in ("load_state", "save_state")]
    assert _plans()["tiny keep_cpu switch"][0].switch_state == "keep_cpu"


def test_op_names_are_unique_within_a_phase(case):
    _, _, sched = case
    for ph in sched.phases:
        names = [op.name for op in ph.ops]
        assert len(set(names)) == len(names), [n for n, c in Counter(names).items() if c > 1]
        switch = [op.name for op in ph.switch_ops]
        assert len(set(switch)) == len(switch)


def test_pretraining_phases_train_the_embedding_and_the_head():
    """The embedding's phase runs backward down to layer 0 with its weight gradient (no input gradient below it)
    and steps it; the head's own phase runs every other layer forward only, saving nothing, and backward through
    the head alone. A planned pretraining run puts both in blocks."""
    plan, prof = _plans()["tiny pretraining, own blocks"]
    sched = build_schedule(plan, prof)
    head = plan.n_layers - 1
    emb, top = sched.phases[0], sched.phases[-1]
    bwd0 = [op for op in emb.ops if op.kind == "backward" and op.layer == 0]
    assert len(bwd0) == plan.shape.grad_accum
    # the weight gradient of a lookup is a scatter-add: memory traffic, no matmul FLOPs
    assert all(op.flops == sched.sizes[0].bwd_flops and op.traffic_bytes == 2 * sched.sizes[0].traffic_bytes > 0
               and op.alloc_bytes == 0 for op in bwd0)
    assert [op.layer for op in emb.ops if op.kind == "optimizer_step"] == [0]
    assert emb.static["master"] == sched.sizes[0].params * 4
    assert {op.layer for op in top.ops if op.kind == "backward"} == {head}
    assert all(op.alloc_bytes == sched.sizes[op.layer].out_bytes for op in top.ops
               if op.kind == "forward" and 0 < op.layer < head)
    assert [op.layer for op in top.ops if op.kind == "optimizer_step"] == [head]
    assert all(op.flops == sched.sizes[head].bwd_flops for op in top.ops if op.kind == "backward")
    planned, _ = _plans()["tiny pretraining planned"]
    assert planned.blocks[0].first == 0 and planned.blocks[-1].last == head


def test_a_tied_head_is_priced_as_trained_while_the_embeddings_block_trains():
    """A tied model's head forms the matrix's weight gradient in the embedding's phase (the runtime adds it to the
    embedding's): its backward costs a trained layer's FLOPs, it saves what a trained layer saves, and its
    gradient stays on the device until the embedding's backward of the same micro-batch; it takes no optimizer
    step there. The untied model's head, in the same plan, only passes the gradient on."""
    plan, prof = _plans()["tiny pretraining, own blocks"]
    tied_cfg = dataclasses.replace(plan.model, name="tiny-tied", tie_embeddings=True)
    tprof = profile_model(tied_cfg)
    blocks = tuple(Block(first=a, last=b) for a, b in ((0, 2), (3, 5)))
    untied = _force(plan, prof, blocks=blocks)
    tied = _force(plan, tprof, blocks=blocks, model=tied_cfg, fingerprint=tied_cfg.fingerprint())
    head = plan.n_layers - 1
    frees = {}
    for p, pr, trained in ((untied, prof, False), (tied, tprof, True)):
        sched = build_schedule(p, pr)
        sz = sched.sizes[head]
        ph = sched.phases[0]
        bwd = [op for op in ph.ops if op.kind == "backward" and op.layer == head]
        emb = [op for op in ph.ops if op.kind == "backward" and op.layer == 0]
        assert all(op.flops == (sz.bwd_flops if trained else sz.bwd_input_flops) for op in bwd)
        frees[trained] = [op.free_bytes for op in emb]
        held = [op.alloc_bytes - (sched.sizes[head - 1].out_bytes + (sz.param_bytes if trained else 0)) for op in bwd]
        assert held == [0] * len(bwd)
        fwd = [op for op in ph.ops if op.kind == "forward" and op.layer == head]
        kept = sz.saved_bytes if trained else sz.saved_frozen_bytes
        if p.placement(head).activations == "gpu":
            assert all(op.alloc_bytes == sz.out_bytes + kept for op in fwd)
        assert head not in [op.layer for op in ph.ops if op.kind == "optimizer_step"]
    head_bytes = build_schedule(tied, tprof).sizes[head].param_bytes
    assert frees[True] == [f + head_bytes for f in frees[False]]   # the embedding's backward consumes it
    # the head's gradient is live between its backward and the embedding's
    t_peak = memory_timeline(build_schedule(tied, tprof).phases[0])[0]
    u_peak = memory_timeline(build_schedule(untied, prof).phases[0])[0]
    assert t_peak > u_peak
