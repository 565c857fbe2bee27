"""The simulator on clusters: net ops priced by the ring formulas written out here, exposed communication and a
straggler on hand-built schedules (expected times by hand), the scaling bound the cheapest search relies on,
the sweep and cheapest commands, and cheapest's winner against a brute-force search."""
from __future__ import annotations

import dataclasses
import json

import pytest

from planner.cluster import Cluster, make_cluster
from planner.costs import op_seconds
from planner.errors import UserError
from planner.hardware import Link, make_hardware
from planner.models import CATALOG
from planner.planning import Request, make_plan
from planner.profile import profile_model
from planner.schedule import Op, PhaseSchedule, build_schedule
from simulator import cheapest, sweep
from simulator.cost import hourly_price
from simulator.engine import simulate, simulate_phase
from simulator.network import Skew
from tools.cli import run

HW = make_hardware(gpu="rtx4090")
LINK = Link(name="test", gbps=10.0, latency_s=1e-5)      # 10 GB/s, 10 us per ring step


def ring_all_reduce_s(nbytes: int, n: int, link: Link, slow: float = 1.0) -> float:
    """nccl-tests: a ring all-reduce sends 2(N-1)/N of the buffer per rank, in 2(N-1) steps."""
    return 2 * (n - 1) / n * nbytes / (link.gbps * 1e9) * slow + 2 * (n - 1) * link.latency_s


@pytest.fixture(scope="module")
def tiny():
    cfg = CATALOG["tiny"]
    prof = profile_model(cfg)
    req = Request(seq_len=64, batch=4, micro_batch=2, reserve_gib=0.1, min_blocks=2, max_blocks=2)
    return make_plan(cfg, make_hardware(gpu="rtx4090", vram_gib=1), req, prof), prof


def on(plan, cluster: Cluster, shard: bool = False):
    return dataclasses.replace(plan, cluster=cluster, shard_state=shard,
                               shape=dataclasses.replace(plan.shape, gpus=cluster.world))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_net_op_durations_follow_the_ring_formula(tiny, n):
    plan, prof = tiny
    p = on(plan, Cluster(nodes=1, gpus_per_node=n, intra=LINK))
    for skew in (Skew(), Skew(slow_link=2.5)):
        sim = simulate(p, profile=prof, skew=skew)
        nets = 0
        for ph, res in zip(sim.schedule.phases, sim.phases):
            for op in ph.ops:
                if op.stream == "net":
                    nets += 1
                    dur = res.finish[op.id] - res.start[op.id]
                    assert dur == pytest.approx(ring_all_reduce_s(op.bytes, n, LINK, skew.slow_link), rel=1e-9)
            # each rank sends 2(N-1)/N of every reduced gradient
            grads = sum(sim.schedule.sizes[i].param_bytes for i in ph.layers)
            assert res.wire_bytes == pytest.approx(2 * (n - 1) / n * grads, abs=len(ph.layers))
        assert nets == sum(len(ph.layers) for ph in sim.schedule.phases)


def test_two_nodes_pay_the_slower_level(tiny):
    plan, prof = tiny
    fast, slow = Link(name="f", gbps=100.0, latency_s=0.0), Link(name="s", gbps=5.0, latency_s=2e-5)
    p = on(plan, Cluster(nodes=2, gpus_per_node=4, intra=fast, inter=slow, ports_per_node=1))
    sim = simulate(p, profile=prof)
    ph, res = sim.schedule.phases[0], sim.phases[0]
    op = next(o for o in ph.ops if o.stream == "net")
    # across nodes a node is one ring member over the whole buffer, 2(2-1)/2 = 1 x S on its one port;
    # inside a node 2(3)/4 S at 100 GB/s; the slower level bounds it; 2(8-1) ring steps of the larger latency
    expect = max(op.bytes / 5e9, 1.5 * op.bytes / 100e9) + 14 * 2e-5
    assert res.finish[op.id] - res.start[op.id] == pytest.approx(expect, rel=1e-9)


def test_a_cluster_step_is_never_shorter_than_one_gpu(tiny):
    """Collectives only add ops and dependencies: N GPUs run at most N times one GPU's rate (cheapest's bound)."""
    plan, prof = tiny
    one = simulate(plan, profile=prof)
    for c in (make_cluster(plan.hardware.gpu, gpus=2), make_cluster(plan.hardware.gpu, gpus=8, nodes=2)):
        many = simulate(on(plan, c), profile=prof)
        for a, b in zip(one.phases, many.phases):
            assert b.step_seconds >= a.step_seconds
        assert many.tokens_per_s <= c.world * one.tokens_per_s * (1 + 1e-12)


def test_bcd_schedules_are_the_same_ops_for_every_world_above_one(tiny):
    """What cheapest's schedule cache assumes: without sharded state only the prices depend on the cluster."""
    plan, prof = tiny
    two = build_schedule(on(plan, make_cluster(plan.hardware.gpu, gpus=2)), prof)
    sixteen = build_schedule(on(plan, make_cluster(plan.hardware.gpu, gpus=16, nodes=2)), prof)
    assert two.phases == sixteen.phases


def _hand_phase(with_net: bool, bwd_flops=(4 * 10**12, 2 * 10**12), grad_bytes=(2 * 10**9, 2 * 10**9)):
    """Backward of layer 2 then layer 1; each layer's gradient reduced after its backward; the AdamW step waits
    for both reduces (clipping)."""
    ops = [Op(id=0, name="bwd L2", kind="backward", stream="compute", layer=2, flops=bwd_flops[0], tokens=4096)]
    if with_net:
        ops.append(Op(id=1, name="reduce L2", kind="reduce_grads", stream="net", layer=2, bytes=grad_bytes[0],
                      collective="all_reduce", deps=(0,)))
    b1 = len(ops)
    ops.append(Op(id=b1, name="bwd L1", kind="backward", stream="compute", layer=1, flops=bwd_flops[1],
                  tokens=4096, deps=(0,)))
    if with_net:
        ops.append(Op(id=b1 + 1, name="reduce L1", kind="reduce_grads", stream="net", layer=1, bytes=grad_bytes[1],
                      collective="all_reduce", deps=(b1,)))
    ops.append(Op(id=len(ops), name="adam", kind="optimizer_step", stream="compute", layer=1, params=10**8,
                  deps=tuple(range(len(ops)))))
    return PhaseSchedule(block=0, layers=(1, 2), ops=tuple(ops))


def _hand_step(b2, b1, r2, r1, adam):
    """The step by hand: reduce L2 overlaps bwd L1; reduce L1 waits for bwd L1 and the net stream; AdamW for
    everything."""
    t_b1 = b2 + b1
    t_r2 = b2 + r2
    t_r1 = max(t_b1, t_r2) + r1
    return max(t_b1, t_r1) + adam


# reduce L2 longer than bwd L1 (20 ms) by far, by a little, and shorter; reduce L1 always shows (AdamW waits)
@pytest.mark.parametrize("gbps", [1.0, 80.0, 1000.0])
def test_two_gpus_add_exactly_the_exposed_communication(gbps):
    cl = Cluster(nodes=1, gpus_per_node=2, intra=Link(name="x", gbps=gbps, latency_s=5e-6))
    one, two = _hand_phase(False), _hand_phase(True)
    b2, b1, adam = (op_seconds(one.ops[i], HW) for i in range(3))
    r = [ring_all_reduce_s(op.bytes, 2, cl.intra) for op in two.ops if op.stream == "net"]
    s1 = simulate_phase(one, HW).step_seconds
    s2 = simulate_phase(two, HW, cluster=cl).step_seconds
    assert s1 == pytest.approx(b2 + b1 + adam, rel=1e-12)
    exposed = max(0.0, max(b2 + b1, b2 + r[0]) + r[1] - (b2 + b1))
    assert s2 == pytest.approx(s1 + exposed, rel=1e-12)
    assert s2 == pytest.approx(_hand_step(b2, b1, r[0], r[1], adam), rel=1e-12)
    assert s2 >= s1


@pytest.mark.parametrize("k", [1.0, 1.3, 3.0])
def test_a_straggler_stretches_the_step_to_its_own_timeline(k):
    """Every collective waits for the slow rank, so the step is the straggler's: compute x k, the reduces as
    before. The reduce of L1 stays exposed after the last backward, so the step grows by less than k times."""
    cl = Cluster(nodes=1, gpus_per_node=4, intra=Link(name="x", gbps=200.0, latency_s=0.0))
    ph = _hand_phase(True)
    comp = [op for op in ph.ops if op.stream == "compute"]
    b2, b1, adam = (k * op_seconds(op, HW) for op in comp)
    r2, r1 = (ring_all_reduce_s(op.bytes, 4, cl.intra) for op in ph.ops if op.stream == "net")
    got = simulate_phase(ph, HW, cluster=cl, skew=Skew(straggler=k)).step_seconds
    assert got == pytest.approx(_hand_step(b2, b1, r2, r1, adam), rel=1e-12)
    base = simulate_phase(ph, HW, cluster=cl).step_seconds
    # not k times the step: the communication does not slow down with the straggler's compute
    assert base <= got <= k * base + 1e-15
    if k > 1:
        assert got < k * base


def test_straggler_and_slow_link_validation_and_cli(tiny, tmp_path, capsys):
    with pytest.raises(UserError, match="straggler"):
        Skew(straggler=0.5)
    with pytest.raises(UserError, match="slow-link"):
        Skew(slow_link=float("nan"))
    plan, prof = tiny
    p = on(plan, make_cluster(plan.hardware.gpu, gpus=4))
    path = tmp_path / "p4.json"
    path.write_text(p.to_json())
    assert run(["simulate", "--plan", str(path), "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["gpus"] == 4 and base["wire_bytes_per_step"] > 0
    assert run(["simulate", "--plan", str(path), "--straggler", "2", "--slow-link", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["straggler"] == 2 and out["slow_link"] == 3
    for k, v in out["step_seconds_by_phase"].items():
        assert v > base["step_seconds_by_phase"][k]
    assert run(["simulate", "--plan", str(path)]) == 0
    assert "MB sent per rank per step" in capsys.readouterr().out
    assert run(["simulate", "--plan", str(path), "--straggler", "0"]) == 2
    assert run(["simulate", "--plan", str(path), "--trace", str(tmp_path / "t.json")]) == 0
    from simulator.compare import load
    side = load(str(tmp_path / "t.json"))
    assert all(s.get("net", 0) > 0 for s in side.streams.values())


def test_sweep_over_gpus_and_nodes(capsys):
    assert run(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--gpus", "1,2,4", "--nodes", "1,2", "--seq", "64",
                "--workers", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["gpus"], r["nodes"]) for r in rows] == [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]
    one = rows[0]
    assert one["wire_bytes_per_step"] == 0 and one["scaling_efficiency"] == 1.0
    price = hourly_price("rtx4090").per_hour
    for r in rows:
        assert r["fits"] and r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["gpus"])
        assert r["usd_per_btok"] == pytest.approx(price * r["gpus"] / 3600 / r["tokens_per_s"] * 1e9)
        if r["gpus"] > 1:
            assert r["wire_bytes_per_step"] > 0 and r["scaling_efficiency"] > 0
    assert run(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--gpus", "2", "--seq", "64", "--workers", "1"]) == 0
    assert "scaling" in capsys.readouterr().out
    for bad in (["--gpus", "0"], ["--gpus", "two"], ["--gpus", "3", "--nodes", "2"], ["--nodes", "2", "--gpus", "2",
                "--interconnect", "pigeon"]):
        assert run(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--seq", "64", "--workers", "1"] + bad) == 2


def test_cheapest_cli_exit_codes(capsys):
    args = ["cheapest", "--model", "tiny", "--seq", "64", "--gpus", "rtx4090,l40s", "--gpus-max", "4", "--workers", "1"]
    assert run(args + ["--tokens", "1e8", "--deadline", "10h"]) == 0
    out = capsys.readouterr().out
    assert "Cheapest" in out and "why it loses" in out and "planner calls" in out
    assert run(args + ["--tokens", "1e8", "--deadline", "10h", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["winner"]["meets"] and r["winner"]["usd"] > 0
    assert run(args + ["--tokens", "1e16", "--deadline", "1s"]) == 2
    assert "no configuration" in capsys.readouterr().err
    for bad in (["--tokens", "-1", "--deadline", "1h"], ["--tokens", "1e8", "--deadline", "soon"],
                ["--tokens", "1e8", "--deadline", "0h"], ["--tokens", "1e8", "--deadline", "1h", "--gpus", "gtx480"],
                ["--tokens", "1e8", "--deadline", "1h", "--method", "lora"],
                ["--tokens", "1e8", "--deadline", "1h", "--gpus-max", "0"]):
        assert run(args[:4] + ["--workers", "1"] + bad) == 2, bad


def test_cheapest_winner_against_brute_force():
    """Every configuration of a small space planned the way the search says it plans (BCD: one node's rank plan
    on every rank; full per count at its densest layout, by the ILP on 2+ GPUs), simulated in full (no periodic
    shortcut, no schedule cache, no pruning) and priced by hand: the search's winner is the cheapest that meets the
    deadline, and whatever it ruled out unsimulated was ruled out by a true bound."""
    cfg = CATALOG["tiny"]
    prof = profile_model(cfg)
    gpus, per_node, gmax, seq, batch = ["rtx4090", "a100-80g"], 2, 4, 64, 8
    configs = []
    for g in gpus:
        hw = make_hardware(gpu=g)
        for method in ("bcd", "full"):
            for n in (1, 2, 4):
                for nodes in {1: [1], 2: [1, 2], 4: [2, 4]}[n]:
                    if method == "bcd":    # one rank's plan of a node of n / nodes GPUs, fast planner
                        k = n // nodes
                        req = Request(vram_gib=hw.gpu.vram_gib, seq_len=seq, batch=batch * k, gpus=k,
                                      time_limit_s=5.0, shard_state=False if k > 1 else None)
                        plan, _ = sweep.fast_plan(prof, hw, req)
                    else:                  # per count at its densest layout; FSDP (2+ GPUs) by the ILP
                        req = Request(method="full", vram_gib=hw.gpu.vram_gib, seq_len=seq, batch=batch * n, gpus=n,
                                      nodes=max(1, n // per_node), time_limit_s=5.0)
                        plan = make_plan(cfg, hw, req, prof) if n > 1 else sweep.fast_plan(prof, hw, req)[0]
                    c = make_cluster(hw.gpu, gpus=n, nodes=nodes)
                    p = dataclasses.replace(plan, cluster=c, shape=dataclasses.replace(plan.shape, gpus=n))
                    rate = simulate(p, hw, profile=prof, keep_timeline=False).tokens_per_s
                    configs.append((g, method, n, nodes, rate))
    tokens = 1e9
    times = sorted(set(tokens / r for *_, r in configs))
    mid = len(times) // 2
    half = (times[mid - 1] + times[mid]) / 2     # about half the configurations meet it, none on the edge
    cost = {(g, m, n, k): hourly_price(g).per_hour * n * tokens / r / 3600 for g, m, n, k, r in configs}
    true_s = {(g, m, n, k): tokens / r for g, m, n, k, r in configs}
    pruned = set()
    # a deadline about half meet (two processes), and one all meet (one process: every group after the
    # first is measured against the best so far, so dearer ones are ruled out by their bound)
    for deadline, workers in ((half, 2), (1e9, 1)):
        ok = {key: cost[key] for key, t in true_s.items() if t <= deadline}
        assert ok
        res = cheapest.search("tiny", tokens, deadline, gpus=gpus, gpus_max=gmax, per_node_max=per_node,
                              seq_len=seq, batch_per_gpu=batch, workers=workers)
        w = res.winner
        assert w is not None and len(res.candidates) == len(configs)
        assert w.usd == pytest.approx(min(ok.values()), rel=1e-9)
        for c in res.candidates:
            key = (c.gpu, c.method, c.gpus, c.nodes)
            if c.meets:
                assert c.usd >= w.usd and c.usd == pytest.approx(cost[key], rel=1e-9)
            elif c.bound:   # ruled out unsimulated: its bound must be a true bound, and must rule it out
                pruned.add(c.bound)
                assert c.seconds <= true_s[key] * (1 + 1e-9) and c.usd <= cost[key] * (1 + 1e-9)
                assert c.seconds > deadline if c.bound == "deadline" else c.usd > w.usd
            else:
                assert key not in ok
    assert pruned == {"deadline", "cost"}


def test_full_parameter_rate_bound_holds():
    """No full-parameter plan beats the matmul bound cheapest prunes with (one GPU and FSDP on four)."""
    cfg = CATALOG["1b"]
    prof = profile_model(cfg)
    for gpu in ("rtx4090", "a100-80g"):
        hw = make_hardware(gpu=gpu, host_ram_gib=256)
        bound = cheapest.full_rate_bound(prof, hw, 1024)
        for n in (1, 4):
            plan = make_plan(cfg, hw, Request(method="full", seq_len=1024, batch=4 * n, gpus=n, time_limit_s=5.0),
                             prof)
            rate = simulate(plan, profile=prof, keep_timeline=False).tokens_per_s
            assert 0 < rate <= n * bound


def test_compare_methods_on_a_cluster_prices_every_gpu(capsys):
    assert run(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--gpus", "2", "--seq", "64", "--workers", "1",
                "--compare-methods", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in out["rows"]}
    assert len(out["rows"]) == 2 and set(rows) == {"bcd", "full"} and all(r["gpus"] == 2 for r in rows.values())
    # the one-GPU baseline of the scaling figure is evaluated though the grid lacks it, and not listed
    one = sweep.run(sweep.grid(["tiny"], ["rtx4090"], [None], ["bcd"], seq_len=64), workers=1)[0]
    assert rows["bcd"]["scaling_efficiency"] == pytest.approx(rows["bcd"]["tokens_per_s_per_gpu"] / one.tokens_per_s)
    for r in rows.values():   # $/B tokens: two GPU-hours an hour
        assert r["usd_per_btok"] == pytest.approx(0.60 * 2 / 3600 / r["tokens_per_s"] * 1e9)
    (pair,) = out["bcd_vs_full"]
    assert pair["gpus"] == 2 and pair["ratio"] == pytest.approx(rows["full"]["tokens_per_s"]
                                                                / rows["bcd"]["tokens_per_s"])
    assert run(["sweep", "--model", "tiny", "--gpu", "rtx4090", "--gpus", "2", "--seq", "64", "--workers", "1",
                "--compare-methods"]) == 0
    text = capsys.readouterr().out
    assert "GPUs" in text and "counts every GPU" in text


@pytest.mark.parametrize("model,method,shard", [("1b", "bcd", False), ("1b", "bcd", True), ("tiny", "full", True)])
def test_three_micro_batches_extended_equal_the_whole_step_on_a_cluster(model, method, shard):
    """simulator/periodic.py with collectives (a reduce per trained layer; full-parameter training on 8 GPUs,
    FSDP where the planner makes it so, gathers and reduce-scatters in every micro-batch), a straggler and a
    slow link: the same as playing every micro-batch (sweeps and cheapest use the shortcut)."""
    from planner.fastplan import quick_plan
    from simulator.periodic import simulate_repeating
    prof = profile_model(CATALOG[model])
    hw = make_hardware(gpu="rtx4090")
    plan = quick_plan(prof, hw, Request(method=method, vram_gib=12, seq_len=1024 if model == "1b" else 64, batch=8,
                                        micro_batch=1))
    assert plan.shape.grad_accum >= 5
    p = on(plan, make_cluster(hw.gpu, gpus=8, nodes=2, interconnect_name="eth25"), shard=shard)
    for skew in (Skew(), Skew(straggler=1.5, slow_link=2.0)):
        full = simulate(p, profile=prof, keep_timeline=False, skew=skew)
        fast = simulate_repeating(p, profile=prof, skew=skew)
        if method == "bcd":   # (an FSDP step's last played micro-batch is not yet periodic: played in full)
            assert max(len(ph.ops) for ph in fast.schedule.phases) < max(len(ph.ops) for ph in full.schedule.phases)
        for a, b in zip(full.phases, fast.phases):
            assert b.step_seconds == pytest.approx(a.step_seconds, rel=1e-9)
            assert b.busy_seconds["net"] == pytest.approx(a.busy_seconds["net"], rel=1e-9) and a.busy_seconds["net"]
            assert b.wire_bytes == a.wire_bytes > 0
        assert fast.tokens_per_s == pytest.approx(full.tokens_per_s, rel=1e-9)


def test_a_rank_gets_its_share_of_the_node(tiny):
    """Eight ranks on a node: each steps its CPU AdamW at an eighth of the node's rate."""
    plan, prof = tiny
    cpu = tuple(dataclasses.replace(p, master="cpu", moments="cpu", grads="cpu") for p in plan.placements)
    p = on(dataclasses.replace(plan, placements=cpu), make_cluster(plan.hardware.gpu, gpus=8))
    sim = simulate(p, profile=prof)
    rate = plan.hardware.host.cpu_adam_params_per_s / 8
    steps = [(op, r) for ph, r in zip(sim.schedule.phases, sim.phases) for op in ph.ops if op.stream == "cpu_opt"]
    assert steps
    for op, r in steps:
        assert r.finish[op.id] - r.start[op.id] == pytest.approx(op.params / rate, rel=1e-12)


@pytest.mark.parametrize("method,gpu,gpus,nodes", [("bcd", "rtx4090", 8, 1), ("bcd", "a100-80g", 16, 2),
                                                   ("full", "rtx4090", 8, 1), ("full", "a100-80g", 16, 2)])
def test_planner_and_simulator_agree_on_clusters(method, gpu, gpus, nodes):
    """As tests/simulator/test_consistency.py on one GPU: the ILP's estimate (exposed reductions and FSDP
    gathers included) and the simulator's step within 5% on cluster plans the ILP chooses."""
    cfg = CATALOG["1b"]
    prof = profile_model(cfg)
    plan = make_plan(cfg, make_hardware(gpu=gpu), Request(method=method, seq_len=2048, batch=4 * gpus, gpus=gpus,
                                                          nodes=nodes, interconnect="ib-hdr" if nodes > 1 else None,
                                                          time_limit_s=5.0), prof)
    sim = simulate(plan, profile=prof, keep_timeline=False)
    for pred, res in zip(plan.predicted.phases, sim.phases):
        err = res.step_seconds / pred.step_seconds - 1
        assert abs(err) <= 0.05, (f"phase {res.block}: planner {pred.step_seconds:.4g} s, simulator "
                                  f"{res.step_seconds:.4g} s ({err:+.1%}); {res.bottleneck}")
    assert sim.wire_bytes_per_step == pytest.approx(plan.predicted.wire_bytes_per_step, abs=len(plan.blocks))
