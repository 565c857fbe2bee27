"""simulator/engine.py: the event recurrence, memory on the simulated clock, critical path and bottleneck words."""
from __future__ import annotations

import time

import pytest

from planner.costs import op_seconds
from planner.hardware import GB, make_hardware
from planner.models import CATALOG
from planner.planning import Request, make_plan
from planner.profile import profile_model
from planner.schedule import Op, PhaseSchedule, build_schedule
from simulator.engine import simulate, simulate_phase

HW = make_hardware(gpu="rtx4090", pcie_gbps=10.0)   # 10 GB/s: 1 GB takes 0.1 s (+ 10 us latency)


def _load(i, nbytes, deps=(), alloc=0):
    return Op(id=i, name=f"load {i}", kind="load_weights", stream="h2d", layer=i, bytes=nbytes, tier="cpu",
              alloc_bytes=alloc, mem_class="prefetch", deps=deps)


def _fwd(i, flops, deps=(), alloc=0, free=0, transient=0):
    return Op(id=i, name=f"fwd {i}", kind="forward", stream="compute", layer=i, flops=flops, tokens=4096,
              alloc_bytes=alloc, free_bytes=free, transient_bytes=transient, mem_class="activations", deps=deps)


def test_streams_are_fifo_and_ops_wait_for_deps():
    ops = (_load(0, GB), _fwd(1, 10**12, deps=(0,)), _load(2, GB), _fwd(3, 10**12, deps=(2,)))
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=ops), HW)
    load, fwd = op_seconds(ops[0], HW), op_seconds(ops[1], HW)
    assert r.start[0] == 0.0 and r.start[2] == pytest.approx(load)       # h2d runs its loads back to back
    assert r.start[1] == pytest.approx(load)                             # fwd 1 waits for load 0
    assert r.start[3] == pytest.approx(max(2 * load, load + fwd))        # fwd 3: its load and the stream
    assert r.step_seconds == pytest.approx(max(2 * load, load + fwd) + fwd)
    assert r.busy_seconds["h2d"] == pytest.approx(2 * load)
    assert r.utilisation["compute"] == pytest.approx(2 * fwd / r.step_seconds)


def test_critical_path_and_bottleneck_name_the_binding_stream():
    # transfers dominate: each compute waits for its load, so the path is the loads and the last compute
    ops = tuple(x for k in range(4) for x in (_load(2 * k, 4 * GB), _fwd(2 * k + 1, 10**11, deps=(2 * k,))))
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=ops), HW)
    assert r.critical_path == (0, 2, 4, 6, 7)
    assert r.critical_seconds["h2d"] > 0.9 * r.step_seconds
    assert r.bottleneck.startswith("host-to-device link")
    assert "weights streamed from CPU" in r.bottleneck and "busy" in r.bottleneck


def test_memory_follows_the_clock_not_the_list():
    # two loads run back to back while compute waits: both prefetches are live at once on the clock
    ops = (_load(0, GB, alloc=100), _load(1, GB, alloc=100),
           _fwd(2, 10**9, deps=(0,), alloc=10, free=0, transient=1000),
           Op(id=3, name="evict 0", kind="evict", stream="compute", layer=0, free_bytes=100, mem_class="prefetch",
              deps=(2,)))
    ph = PhaseSchedule(block=0, layers=(1,), static={"weights": 5000}, ops=ops)
    r = simulate_phase(ph, HW)
    assert r.peak_bytes == 5000 + 100 + 100 + 10 + 1000
    assert r.peak_breakdown["workspace"] == 1000 and r.peak_breakdown["prefetch"] == 200
    assert r.memory_bytes[-1] == 5000 + 100 + 10      # one prefetch evicted, the output kept


def test_a_dependency_listed_after_its_op_is_refused():
    ops = (_fwd(0, 10**9, deps=(1,)), _fwd(1, 10**9))
    with pytest.raises(ValueError, match="not listed before"):
        simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=ops), HW)


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = CATALOG["tiny"]
    return make_plan(cfg, make_hardware(gpu="rtx4090"), Request(seq_len=256, batch=4, time_limit_s=2.0),
                     profile_model(cfg))


def test_a_resident_plan_is_the_sum_of_its_compute(tiny_plan):
    sim = simulate(tiny_plan)
    for res, ph in zip(sim.phases, sim.schedule.phases):
        assert all(op.stream == "compute" for op in ph.ops)
        assert res.step_seconds == pytest.approx(sum(op_seconds(op, sim.hardware) for op in ph.ops))
        assert res.utilisation["compute"] == pytest.approx(1.0)
    p = tiny_plan
    assert sim.tokens_per_s == pytest.approx(
        p.shape.tokens_per_step * p.steps_per_block * len(p.blocks) / sim.cycle_seconds)


def test_seven_b_simulates_fast():
    """The benchmark's figure, with room for a busy test machine: one step of every phase of a streamed 7B plan."""
    from planner.fastplan import quick_plan
    cfg = CATALOG["7b"]
    prof = profile_model(cfg)
    plan = quick_plan(prof, make_hardware(gpu="rtx4090"), Request(vram_gib=24, seq_len=2048, batch=8))
    sched = build_schedule(plan, prof)
    assert len(sched.phases) >= 3 and sum(len(p.ops) for p in sched.phases) > 2000
    simulate(plan, schedule=sched)
    t0 = time.perf_counter()
    simulate(plan, schedule=sched, keep_timeline=False)
    assert time.perf_counter() - t0 < 0.25


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_a_cpu_device_takes_side_work_from_compute_by_its_cores(cores):
    """A CPU standing in for the device (GPU.shared_cores = k): a copy of L seconds beside a forward of F seconds
    on k cores. Processor sharing: the copy's thread holds one of the k cores while it copies, so the forward ends
    at F + L / k (a GPU, shared_cores 0, overlaps them: F). A forward that waits for its copy overlaps nothing."""
    from dataclasses import replace
    cpu = replace(HW, gpu=replace(HW.gpu, shared_cores=cores))
    beside = (_fwd(0, 4 * 10**13), _load(1, GB))
    f, load = op_seconds(beside[0], HW), op_seconds(beside[1], HW)
    assert load < f
    assert simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=beside), HW).step_seconds == pytest.approx(f)
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=beside), cpu)
    assert r.step_seconds == pytest.approx(f + load / cores, rel=1e-6)
    assert r.finish[1] == pytest.approx(load)          # the copy's own time is what it was priced at
    after = (_load(0, GB), _fwd(1, 4 * 10**13, deps=(0,)))
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=after), cpu)
    assert r.step_seconds == pytest.approx(load + f)


def test_a_cpu_device_stretches_only_the_compute_ops_a_copy_overlaps():
    """Two forwards of F, a copy of L issued after the first (it depends on it): the copy runs beside the second
    forward only, which ends L later on one core: 2F + L, and the first forward keeps F."""
    from dataclasses import replace
    cpu = replace(HW, gpu=replace(HW.gpu, shared_cores=1))
    ops = (_fwd(0, 10**13), _fwd(1, 10**13, deps=(0,)), _load(2, GB, deps=(0,)))
    f, load = op_seconds(ops[0], HW), op_seconds(ops[2], HW)
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=ops), cpu)
    assert r.finish[0] == pytest.approx(f)
    assert r.step_seconds == pytest.approx(2 * f + load, rel=1e-6)
    assert r.busy_seconds["compute"] == pytest.approx(2 * f + load, rel=1e-6)


@pytest.mark.parametrize("cpu_gbps", [0.0, 0.5, 2.0])
def test_a_cpu_device_takes_only_a_collectives_cpu_work_from_compute(cpu_gbps):
    """A gradient all-reduce of S bytes on 2 ranks of one node (a 0.1 GB/s link: D = S / 0.1 GB/s + 2 latencies)
    beside a forward of F > D on one core. Its threads work for W = S / collective_cpu_gbps of CPU time (2 ranks'
    ring sends S: 2(N-1)/N x S); the rest of D they wait. Spread evenly over D, the forward ends at F + W (all of
    the collective overlaps it); unmeasured (0), the whole of D is taken: F + D. W is capped at D."""
    from dataclasses import replace

    from planner.cluster import Cluster
    from planner.hardware import Link
    link = Link(name="slow", gbps=0.1, latency_s=1e-4)
    size = 50 * 10**6
    cpu = replace(HW, gpu=replace(HW.gpu, shared_cores=1, collective_cpu_gbps=cpu_gbps))
    red = Op(id=1, name="reduce 1", kind="reduce_grads", stream="net", layer=1, bytes=size, collective="all_reduce")
    ops = (_fwd(0, 4 * 10**14), red)
    f = op_seconds(ops[0], HW)
    d = size / (link.gbps * 1e9) + 2 * link.latency_s
    assert d < f
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=ops), cpu,
                       cluster=Cluster(nodes=1, gpus_per_node=2, intra=link))
    assert r.finish[1] == pytest.approx(d)          # the collective's own time is what the ring model prices
    work = min(d, size / (cpu_gbps * 1e9)) if cpu_gbps else d
    assert r.step_seconds == pytest.approx(f + work, rel=1e-6)
