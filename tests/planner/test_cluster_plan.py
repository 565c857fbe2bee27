"""Planning clusters (issue 10): the global batch, per-GPU memory in every phase (the schedule's replay), the bytes
each rank sends per step against the ring formulas written out here, sharded state, what a node's ranks share
(host RAM, its bandwidths), FSDP for --method full, and the plan command's cluster flags.

Expected values come from formulas in this file: a Llama decoder layer's parameters from its config
(q and o: h x h; k and v: h x kv_heads x head_dim; SwiGLU: 3 x h x ffn; two RMSNorms: 2h), bf16 bytes = 2 x params,
a ring all-reduce sends 2(N-1)/N of the buffer, a reduce-scatter or an all-gather (N-1)/N (nccl-tests)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from planner import memory
from planner.cluster import make_cluster, rank_hardware
from planner.errors import UserError
from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.plan import Plan, load_plan
from planner.planning import Request, make_plan, predict
from planner.profile import profile_model
from planner.schedule import build_schedule, memory_timeline
from tools.cli import run

TINY = CATALOG["tiny"]


def decoder_params(cfg) -> int:
    h, hd = cfg.hidden, cfg.head_dim
    return 2 * h * h + 2 * h * cfg.kv_heads * hd + 3 * h * cfg.ffn + 2 * h


def layer_params(cfg, i: int) -> int:
    """Layer i of the plan's numbering: 0 the embedding, 1..n decoders, n+1 the head (lm_head + final norm)."""
    if i == 0:
        return cfg.vocab * cfg.hidden
    if i == cfg.layers + 1:
        return cfg.vocab * cfg.hidden + cfg.hidden
    return decoder_params(cfg)


def ring(kind: str, nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring collective over an nbytes buffer (floored to whole bytes)."""
    return (2 * (n - 1) * nbytes if kind == "all_reduce" else (n - 1) * nbytes) // n


@pytest.fixture(scope="module")
def prof():
    return profile_model(TINY)


def tiny_plan(prof, **kw) -> Plan:
    req = dict(seq_len=64, batch=8, reserve_gib=0.01, vram_gib=0.05)
    req.update(kw)
    hw = make_hardware(gpu="rtx4090", host_ram_gib=kw.pop("host_ram_gib", 8))
    return make_plan(TINY, hw, Request(**{k: v for k, v in req.items() if k != "host_ram_gib"}), prof)


def assert_within_budget(plan: Plan, prof) -> None:
    """Per-GPU memory of every phase, replayed op by op from the schedule, within the budget less the reserve,
    and equal to what the plan predicts."""
    cap = plan.budget_bytes - plan.reserve_bytes
    sched = build_schedule(plan, prof)
    assert len(sched.phases) == len(plan.predicted.phases)
    for ph, pred in zip(sched.phases, plan.predicted.phases):
        peak = memory_timeline(ph)[0]
        assert 0 < peak <= cap
        assert peak == pred.peak_vram_bytes


def test_the_formulas_match_the_profile(prof):
    assert [lp.params for lp in prof.layers] == [layer_params(TINY, i) for i in range(TINY.layers + 2)]
    assert all(lp.param_bytes == 2 * lp.params for lp in prof.layers)


CASES = [dict(gpus=2, shard_state=False), dict(gpus=2, shard_state=True), dict(gpus=4, nodes=2, shard_state=False),
         dict(gpus=8, interconnect_gbps=1.0, shard_state=None), dict(gpus=4, nodes=4, shard_state=True, batch=16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cluster_plans_fit_every_phase_and_send_only_the_active_blocks_gradients(prof, case):
    plan = tiny_plan(prof, **case)
    n = case["gpus"]
    s = plan.shape
    assert plan.world == s.gpus == n and plan.cluster.nodes == case.get("nodes", 1)
    # --batch is the global batch: every rank runs batch / gpus sequences per step
    assert s.micro_batch * s.grad_accum * n == case.get("batch", 8)
    assert s.tokens_per_step == case.get("batch", 8) * 64
    if case["shard_state"] is not None:
        assert plan.shard_state is case["shard_state"]
    assert_within_budget(plan, prof)
    for blk, ph in zip(plan.blocks, plan.predicted.phases):
        grads = [2 * layer_params(TINY, i) for i in blk.layers]
        if plan.shard_state:   # reduce-scatter the gradients, all-gather the updated weights: (N-1)/N each
            want = sum(ring("reduce_scatter", g, n) + ring("all_gather", g, n) for g in grads)
        else:                  # all-reduce: 2(N-1)/N of the active block's gradient bytes; frozen layers send nothing
            want = sum(ring("all_reduce", g, n) for g in grads)
        assert ph.wire_bytes_per_step == want
        assert ph.net_seconds > 0
    assert plan.predicted.wire_bytes_per_step == sum(p.wire_bytes_per_step for p in plan.predicted.phases) // len(
        plan.blocks)
    # the solver's objective (seconds per token) is what the plan predicts, network included
    assert plan.solver.objective * plan.predicted.tokens_per_s == pytest.approx(1, rel=2e-3)
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert back == plan


def test_sharded_state_divides_the_state_per_gpu_by_the_world(prof):
    plan = tiny_plan(prof, gpus=4, shard_state=False, vram_gib=0.2)
    assert all(p.master == "gpu" for p in plan.placements)
    sharded = dataclasses.replace(plan, shard_state=True)
    for k, blk in enumerate(plan.blocks):
        a = build_schedule(plan, prof).phases[k].static
        b = build_schedule(sharded, prof).phases[k].static
        params = [layer_params(TINY, i) for i in blk.layers]
        assert a["master"] + a["moments"] == 12 * sum(params)
        assert b["master"] + b["moments"] == 12 * sum(-(-p // 4) for p in params)   # ceil(p / N) each
        assert (a["master"] + a["moments"]) / (b["master"] + b["moments"]) == pytest.approx(4, rel=1e-3)
        assert a["grads"] == b["grads"] == 2 * sum(params)   # reduced in place: the whole gradient stays


def test_auto_sharding_is_the_better_of_on_and_off(prof):
    rates = {s: tiny_plan(prof, gpus=4, shard_state=s, vram_gib=0.2).predicted.tokens_per_s for s in (False, True)}
    auto = tiny_plan(prof, gpus=4, shard_state=None, vram_gib=0.2)
    assert auto.predicted.tokens_per_s >= max(rates.values()) * (1 - 2e-3)


def test_the_searchs_cheap_bound_is_below_every_cluster_subproblems_optimum(prof):
    """The search prunes on ilp.lower_bound; with the network and sharding priced it must stay a lower bound."""
    from planner import ilp
    from planner.planning import _problem
    for req in (Request(seq_len=64, batch=8, gpus=4, nodes=2, interconnect_gbps=1e-3),
                Request(seq_len=64, batch=8, gpus=4, shard_state=None)):
        pb = _problem(prof, make_hardware(gpu="rtx4090", host_ram_gib=8), req, 1, int(0.04 * (1 << 30)))
        choices = ilp._all_choices(pb)
        assert len(choices) == 2 * len(memory.tiers(pb.hw))   # each tier, sharded or not
        assert {c for c in choices if c.shard} <= set(ilp.state_choices(pb))   # the search drops only unsharded
        for choice in choices:
            for u in range(1, TINY.layers + 1):
                sol = ilp.solve(pb, u, choice, work_limit=5.0)
                if sol is not None and sol.status == "OPTIMAL":
                    # (the solver's objective is rounded: each cost to 1/2000 of the dearest layer pass)
                    assert ilp.lower_bound(pb, u, choice) <= sol.objective_s * (1 + 2e-3)
                    assert sol.shard is choice.shard


def test_a_node_holds_streamed_weights_once_and_every_rank_its_own_buffers(prof):
    plan = tiny_plan(prof, gpus=8, vram_gib=0.011, host_ram_gib=8)
    assert_within_budget(plan, prof)
    cpu = [p.layer for p in plan.placements if p.weights == "cpu"]
    assert cpu, "the budget should make some weights stream from host memory"
    sizes = build_schedule(plan, prof).sizes
    one, node = (memory.host_breakdown(plan, sizes, ranks=r) for r in (1, 8))
    pinned = sum(2 * layer_params(TINY, i) for i in cpu)
    assert one["pinned_weights"] == node["pinned_weights"] == pinned
    for k in one:
        if k != "pinned_weights":
            assert node[k] == 8 * one[k]
    assert plan.predicted.host_ram_bytes == sum(node.values())


def test_a_rank_gets_its_share_of_the_nodes_bandwidths():
    hw = make_hardware(gpu="rtx4090", nvme_gib=100)
    r = rank_hardware(hw, make_cluster(hw.gpu, gpus=8))
    assert r.host.nvme_read_gbps == pytest.approx(hw.host.nvme_read_gbps / 8)
    assert r.host.nvme_write_gbps == pytest.approx(hw.host.nvme_write_gbps / 8)
    assert r.host.cpu_adam_params_per_s == pytest.approx(hw.host.cpu_adam_params_per_s / 8)
    # eight cards asking 25 GB/s each of a 150 GB/s memory system get 18.75 GB/s each
    assert r.link("h2d").gbps == pytest.approx(min(hw.gpu.h2d_gbps, hw.host.mem_gbps / 8))
    assert r.host.ram_gib == hw.host.ram_gib and r.vram_bytes == hw.vram_bytes   # capacities stay the node's
    assert rank_hardware(hw, make_cluster(hw.gpu, gpus=4, nodes=4)) == hw        # one GPU a node shares nothing


def test_a_calibrated_collective_figure_is_the_link_between_a_nodes_gpus(prof):
    hw = make_hardware(gpu="rtx4090", host_ram_gib=8)
    hw = dataclasses.replace(hw, host=dataclasses.replace(hw.host, collective_gbps=7.5))
    plan = make_plan(TINY, hw, Request(seq_len=64, batch=8, reserve_gib=0.01, vram_gib=0.05, gpus=2), prof)
    assert plan.cluster.intra.gbps == 7.5 and plan.cluster.intra.name == "calibrated"


def test_the_exposed_reduction_is_between_its_bounds(prof):
    """One GPU per node (nothing shared, so only the network differs from the single-GPU plan), a link so slow
    that every reduction outlasts any backward: a phase of s layers adds at most s x r (nothing hidden) and at
    least s x r less the whole single-GPU step (all backward overlapped), r = S / bandwidth + 2(N-1) latencies."""
    one = tiny_plan(prof, gpus=1, vram_gib=0.2, min_blocks=2, max_blocks=2, micro_batch=2)
    assert one.shape.grad_accum == 4
    half = dataclasses.replace(one.shape, grad_accum=2)   # each of two ranks runs half the global batch
    two = dataclasses.replace(one, cluster=make_cluster(one.hardware.gpu, gpus=2, nodes=2, interconnect_gbps=1e-3),
                              shape=dataclasses.replace(half, gpus=2))
    p1 = predict(dataclasses.replace(one, shape=half), prof)
    p2 = predict(two, prof)
    for blk, a, b in zip(one.blocks, p1.phases, p2.phases):
        r = [2 * layer_params(TINY, i) / 1e6 + 2 * 20e-6 for i in blk.layers]   # 2(N-1)/N S = S at N = 2
        extra = b.step_seconds - a.step_seconds
        assert sum(r) - a.step_seconds <= extra <= sum(r) * (1 + 1e-9)


@pytest.mark.parametrize("vram", [0.05, 0.011], ids=["on-gpu", "cpu-offload"])
def test_full_on_8_gpus_is_fsdp_with_weight_gathers_on_the_wire(prof, vram):
    plan = tiny_plan(prof, gpus=8, method="full", vram_gib=vram)
    n, g = 8, plan.shape.grad_accum
    assert plan.shard_state and plan.world == 8
    assert_within_budget(plan, prof)
    # what FSDP2 runs (runtime/fsdp.py): one offload policy for the model (weight shards where the state is),
    # no activation offload, nothing on NVMe
    assert all(p.weights == p.master and p.activations != "cpu" and p.master != "nvme" for p in plan.placements)
    sizes = [2 * layer_params(TINY, i) for i in range(TINY.layers + 2)]
    # per micro-batch, every layer all-gathered for forward and again for backward, its gradient reduce-scattered
    want = g * sum(2 * ring("all_gather", s, n) + ring("reduce_scatter", s, n) for s in sizes)
    assert plan.predicted.phases[0].wire_bytes_per_step == want
    ph = build_schedule(plan, prof).phases[0]
    gathers = [op for op in ph.ops if op.kind == "gather_weights"]
    assert len(gathers) == 2 * g * len(sizes) and all(op.collective == "all_gather" for op in gathers)
    reduces = [op for op in ph.ops if op.kind == "reduce_grads"]
    assert len(reduces) == g * len(sizes) and all(op.collective == "reduce_scatter" for op in reduces)
    # weights, gradients and optimizer state: each rank holds its shard, (2 + 2 + 12) bytes x params / N
    on_gpu = [i for i, p in enumerate(plan.placements) if p.master == "gpu"]
    want_state = sum(12 * -(-layer_params(TINY, i) // n) for i in on_gpu)
    assert ph.static["master"] + ph.static["moments"] == want_state
    assert ph.static["grads"] == sum(2 * -(-layer_params(TINY, i) // n) for i in on_gpu)
    assert ph.static["weights"] == sum(2 * -(-layer_params(TINY, i) // n)
                                       for i, p in enumerate(plan.placements) if p.weights == "gpu")
    if vram < 0.02:   # CPU offload: each of the node's 8 ranks keeps its shards of state, gradients, weights in RAM
        assert all(p.master == "cpu" for p in plan.placements)
        host = memory.host_breakdown(plan, build_schedule(plan, prof).sizes)
        shards = [-(-layer_params(TINY, i) // n) for i in range(TINY.layers + 2)]
        assert host["trained_layers"] == 8 * sum((12 + 4) * p for p in shards)
        assert host["pinned_weights"] == 8 * sum(2 * shards[p.layer] for p in plan.placements if p.weights == "cpu")


def test_old_plan_files_load(tmp_path, prof):
    plan = tiny_plan(prof)
    d = plan.to_dict()
    for k in ("cluster", "shard_state"):
        d.pop(k)
    d["predicted"].pop("wire_bytes_per_step")
    for ph in d["predicted"]["phases"]:
        ph.pop("wire_bytes_per_step")
        ph.pop("net_seconds")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    assert load_plan(str(path)) == plan


def test_global_batch_must_divide_over_the_gpus(prof):
    with pytest.raises(UserError, match="global batch"):
        tiny_plan(prof, gpus=8, batch=12)
    with pytest.raises(UserError, match="micro-batch"):
        tiny_plan(prof, gpus=4, batch=8, micro_batch=4)


def plan_cli(capsys, *args):
    code = run(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args", [["--gpu", "rtx4090", "--gpus", "8"],
                                  ["--gpu", "a100-80g", "--gpus", "8", "--nodes", "2"]])
def test_the_acceptance_cluster_plans(tmp_path, capsys, args):
    out = tmp_path / "p.json"
    code, text, err = plan_cli(capsys, "--model", "7b", *args, "--out", str(out))
    assert code == 0, err
    p = load_plan(str(out))
    assert p.world == 8 and p.cluster.nodes == (2 if "--nodes" in args else 1)
    assert all(ph.peak_vram_bytes <= p.budget_bytes - p.reserve_bytes for ph in p.predicted.phases)
    assert p.predicted.host_ram_bytes <= memory.host_usable_bytes(p.hardware)
    assert p.predicted.wire_bytes_per_step > 0
    assert "cluster:" in text and "per node" in text and "on the wire" in text


def test_7b_fsdp_on_8_gpus_sends_two_gathers_and_a_reduce_scatter_of_every_layer(tmp_path, capsys):
    cfg = CATALOG["7b"]
    out = tmp_path / "full.json"
    code, text, err = plan_cli(capsys, "--model", "7b", "--gpu", "rtx4090", "--gpus", "8", "--method", "full",
                               "--out", str(out))
    assert code == 0, err
    p = load_plan(str(out))
    assert p.method == "full" and p.world == 8 and "FSDP" in text
    assert all(ph.peak_vram_bytes <= p.budget_bytes - p.reserve_bytes for ph in p.predicted.phases)
    layers = [2 * layer_params(cfg, i) for i in range(cfg.layers + 2)]
    want = p.shape.grad_accum * sum(2 * ring("all_gather", s, 8) + ring("reduce_scatter", s, 8) for s in layers)
    assert p.predicted.wire_bytes_per_step == want
    assert want > 3 * 0.87 * 2 * 6.7e9   # about three times the bf16 model, 7/8 of it each time


@pytest.mark.parametrize("bad", [["--gpus", "0"], ["--gpus", "8", "--nodes", "3"], ["--gpus", "2", "--nodes", "4"],
                                 ["--gpus", "4", "--nodes", "2", "--interconnect", "carrier-pigeon"],
                                 ["--gpus", "4", "--nodes", "2", "--interconnect-gbps", "-1"],
                                 ["--gpus", "4", "--nodes", "2", "--interconnect", "ib-hdr",
                                  "--interconnect-gbps", "9"],
                                 ["--gpus", "2", "--interconnect", "ib-hdr"], ["--shard-state", "on"],
                                 ["--gpus", "8", "--batch", "12"], ["--gpus", "2", "--shard-state", "maybe"],
                                 ["--gpus", "1.5"], ["--ports-per-node", "0", "--gpus", "2", "--nodes", "2"]])
def test_bad_cluster_flags_exit_2_with_one_paragraph(capsys, bad):
    code, _, err = plan_cli(capsys, "--model", "tiny", "--seq", "64", "--vram", "0.05", "--reserve", "0.01", *bad)
    assert code == 2
    assert err.strip() and "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.startswith("error")]) == 1
