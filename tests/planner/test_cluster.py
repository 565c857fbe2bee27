"""planner/cluster.py and the schedule's collectives: ring costs against the nccl-tests formulas written out here,
and the reduce/gather ops a data-parallel plan adds (only the active block's layers, the right sizes)."""
from __future__ import annotations

import dataclasses

import pytest

from planner.cluster import Cluster, collective_seconds, interconnect, make_cluster, wire_bytes
from planner.errors import UserError
from planner.hardware import Link, load_gpu, make_hardware
from planner.models import CATALOG
from planner.plan import Plan, Shape, validate
from planner.planning import Request, make_plan, predict
from planner.profile import profile_model
from planner.schedule import build_schedule


def test_wire_bytes_follow_the_ring_formulas():
    s = 1_000_000
    for n in (2, 3, 8):
        assert wire_bytes("all_reduce", s, n) == 2 * (n - 1) * s // n
        assert wire_bytes("reduce_scatter", s, n) == (n - 1) * s // n
        assert wire_bytes("all_gather", s, n) == (n - 1) * s // n
    assert wire_bytes("all_reduce", s, 1) == 0


def test_one_node_all_reduce_time_is_bytes_over_link_plus_latency():
    link = Link(name="x", gbps=10.0, latency_s=1e-5)
    c = Cluster(nodes=1, gpus_per_node=4, intra=link)
    s = 400_000_000
    expect = 2 * 3 / 4 * s / 10e9 + 2 * 3 * 1e-5
    assert collective_seconds("all_reduce", s, c) == pytest.approx(expect, rel=1e-12)


def test_two_nodes_are_bounded_by_the_slower_level():
    fast, slow = Link(name="f", gbps=100.0, latency_s=0), Link(name="s", gbps=12.5, latency_s=0)
    c = Cluster(nodes=2, gpus_per_node=8, intra=fast, inter=slow, ports_per_node=1)
    s = 1_000_000_000
    # the node's one port carries 2(M-1)/M of the whole buffer: 1 GB at 12.5 GB/s
    assert collective_seconds("all_reduce", s, c) == pytest.approx(s / 12.5e9, rel=1e-12)
    c8 = dataclasses.replace(c, ports_per_node=8)
    assert collective_seconds("all_reduce", s, c8) == pytest.approx(2 * 7 / 8 * s / 100e9, rel=1e-12)


def test_make_cluster_picks_links_and_refuses_bad_shapes():
    c = make_cluster(load_gpu("rtx4090"), gpus=8)
    assert c.world == 8 and c.intra.name == "pcie-host" and c.inter is None
    assert c.intra.gbps < 25.0   # hardware.md: plan below 25 GB/s per card without P2P
    a = make_cluster(load_gpu("a100-80g"), gpus=16, nodes=2, interconnect_name="ib-hdr")
    assert a.gpus_per_node == 8 and a.intra.gbps == 300.0 and a.inter.gbps == 25.0 and a.ports_per_node == 8
    for bad in (dict(gpus=3, nodes=2), dict(gpus=0), dict(gpus=2, interconnect_name="carrier-pigeon", nodes=2)):
        with pytest.raises(UserError):
            make_cluster(load_gpu("rtx4090"), **bad)
    with pytest.raises(UserError):
        interconnect(gbps=-1.0)


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = CATALOG["tiny"]
    prof = profile_model(cfg)
    req = Request(seq_len=64, batch=4, micro_batch=2, reserve_gib=0.1, min_blocks=3, max_blocks=3)
    plan = make_plan(cfg, make_hardware(gpu="rtx4090", vram_gib=1), req, prof)
    return plan, prof


def _on(plan: Plan, prof, world: int, shard: bool) -> Plan:
    cl = make_cluster(plan.hardware.gpu, gpus=world)
    p = dataclasses.replace(plan, cluster=cl, shard_state=shard,
                            shape=dataclasses.replace(plan.shape, gpus=world))
    p = dataclasses.replace(p, predicted=predict(p, prof))
    validate(p)
    return p


@pytest.mark.parametrize("shard", [False, True])
def test_data_parallel_schedule_reduces_only_the_active_block(tiny_plan, shard):
    plan, prof = tiny_plan
    p = _on(plan, prof, 2, shard)
    sched = build_schedule(p, prof)
    for ph in sched.phases:
        red = [op for op in ph.ops if op.kind == "reduce_grads"]
        assert sorted(op.layer for op in red) == list(ph.layers)
        for op in red:
            assert op.bytes == sched.sizes[op.layer].param_bytes and op.stream == "net"
            assert op.collective == ("reduce_scatter" if shard else "all_reduce")
        steps = {op.layer: op for op in ph.ops if op.kind == "optimizer_step"}
        for op in red:   # the step waits for its reduce (and, for the clip, every reduce)
            assert op.id in steps[op.layer].deps
        gathers = [op for op in ph.ops if op.kind == "gather_weights"]
        assert len(gathers) == (len(ph.layers) if shard else 0)
        for i, st in steps.items():
            full = sched.sizes[i].params
            assert st.params == ((full + 1) // 2 if shard else full)
    one = build_schedule(plan, prof)
    assert not any(op.stream == "net" for ph in one.phases for op in ph.ops)


def test_plan_with_gpus_round_trips_and_mismatch_is_refused(tiny_plan):
    plan, prof = tiny_plan
    p = _on(plan, prof, 2, False)
    back = Plan.from_dict(p.to_dict())
    assert back == p and back.world == 2
    with pytest.raises(UserError, match="shape.gpus"):
        validate(dataclasses.replace(p, shape=Shape(micro_batch=2, seq_len=64, grad_accum=2, gpus=1)))
    with pytest.raises(UserError, match="shard_state"):
        validate(dataclasses.replace(plan, shard_state=True))
