"""NVMe transfers in the simulator, against the link formula: seconds = latency + bytes / bandwidth.

The planner and the simulator price ops with the same cost model, so comparing them cannot show a transfer priced
wrong in both; these expectations are written out from the hardware's figures instead (GB = 1e9 bytes, 10 us of
latency per request, hardware.md)."""
from __future__ import annotations

import os
import sys

import pytest

from planner.hardware import make_hardware
from planner.schedule import Op, PhaseSchedule
from simulator.engine import simulate, simulate_phase

LATENCY_S = 10e-6
HW = make_hardware(gpu="rtx4090", pcie_gbps=20.0, nvme_gib=100, nvme_read_gbps=2.5, nvme_write_gbps=1.25)


def seconds(nbytes: int, gbps: float) -> float:
    return LATENCY_S + nbytes / (gbps * 1e9)


def test_an_nvme_read_then_load_takes_both_transfers_in_turn():
    n = 500_000_000
    ops = (Op(id=0, name="read L1", kind="read_weights", stream="nvme_read", layer=1, bytes=n, tier="nvme"),
           Op(id=1, name="load L1", kind="load_weights", stream="h2d", layer=1, bytes=n, tier="nvme", deps=(0,)),
           Op(id=2, name="write state L1", kind="write_state", stream="nvme_write", layer=1, bytes=n, tier="nvme"))
    r = simulate_phase(PhaseSchedule(block=0, layers=(1,), ops=ops), HW)
    read, load, write = seconds(n, 2.5), seconds(n, 20.0), seconds(n, 1.25)   # 0.2 s, 0.025 s, 0.4 s
    assert r.finish[0] - r.start[0] == pytest.approx(read, rel=1e-12)
    assert r.start[1] == pytest.approx(read, rel=1e-12)                      # the load waits for the read
    assert r.finish[2] == pytest.approx(write, rel=1e-12)                    # the write runs alongside
    assert r.step_seconds == pytest.approx(max(read + load, write), rel=1e-12)
    assert r.busy_seconds["nvme_read"] == pytest.approx(read, rel=1e-12)


def test_a_plan_with_nvme_weights_and_state_prices_every_nvme_op_by_the_link():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime"))
    from test_equivalence import P, tiny_plan
    plan = tiny_plan([P(0, "gpu", "gpu", "gpu"), P(1, "nvme", "nvme", "recompute"), P(2, "nvme", "gpu", "gpu"),
                      P(3, "gpu", "nvme", "gpu"), P(4, "nvme", "nvme", "cpu"), P(5, "gpu", "gpu", "gpu")])
    sim = simulate(plan, HW)
    kinds = set()
    for ph, res in zip(sim.schedule.phases, sim.phases):
        nvme_busy = {"nvme_read": 0.0, "nvme_write": 0.0}
        for op in ph.ops:
            if op.stream in nvme_busy:
                # writes queue on the drive's write stream, reads on its read stream
                assert op.stream == ("nvme_write" if op.kind.startswith("write") else "nvme_read"), op.name
                want = seconds(op.bytes, 2.5 if op.stream == "nvme_read" else 1.25)
                assert op.bytes > 0 and res.finish[op.id] - res.start[op.id] == pytest.approx(want, rel=1e-9)
                nvme_busy[op.stream] += want
                kinds.add(op.kind)
        for stream, busy in nvme_busy.items():
            assert res.busy_seconds[stream] == pytest.approx(busy, rel=1e-9)
            assert res.step_seconds >= busy   # one drive queue: a step lasts at least its reads
    assert kinds >= {"read_weights", "read_state", "write_state", "write_weights"}


def test_switches_move_state_through_the_drive_and_count_in_the_cycle():
    """keep_nvme: at each switch the block's device or host state is read from and written to the drive, both
    queues at once; the cycle is steps_per_block steps of every phase plus its switch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime"))
    from test_equivalence import P, tiny_plan
    plan = tiny_plan([P(i, "gpu", "gpu" if i % 2 else "cpu", "gpu") for i in range(6)], switch_state="keep_nvme",
                     steps_per_block=3)
    sim = simulate(plan, HW)
    for ph, res in zip(sim.schedule.phases, sim.phases):
        reads = [op.bytes for op in ph.switch_ops if op.kind == "load_state"]
        writes = [op.bytes for op in ph.switch_ops if op.kind == "save_state"]
        assert reads and len(reads) == len(writes) == len(ph.layers)
        assert {op.stream for op in ph.switch_ops} == {"nvme_read", "nvme_write"}
        want = max(sum(seconds(n, 2.5) for n in reads), sum(seconds(n, 1.25) for n in writes))
        assert res.switch_seconds == pytest.approx(want, rel=1e-12) and want > 0
    cycle = sum(3 * res.step_seconds + res.switch_seconds for res in sim.phases)
    assert sim.cycle_seconds == pytest.approx(cycle, rel=1e-12)
    assert sim.tokens_per_s == pytest.approx(3 * len(sim.phases) * plan.shape.tokens_per_step / cycle, rel=1e-12)
