"""What the ILP and the plan's predictions charge for one layer's passes, its optimizer step, its gradient's
reduction over the ranks and a block switch: the schedule's own ops (planner.schedule) priced by the one cost
model (planner.costs), each group at its busiest stream, collectives by planner.cluster.collective_seconds.
planner.ilp builds its tables from these; planning.predict sums them for a plan; the fast planner reads them too.
"""
from __future__ import annotations

from planner.cluster import SINGLE, Cluster, collective_seconds
from planner.costs import LayerSizes, stream_seconds
from planner.hardware import Hardware
from planner.memory import STATE_BYTES, kept_tier, shard_params
from planner.plan import Placement
from planner.schedule import Builder, optimizer_ops, pass_ops


def overlapped_seconds(ops, hw: Hardware, cluster: Cluster = SINGLE) -> float:
    """The ILP's linearisation of a group of operations: the busiest stream's total, the `net` stream's ops
    priced by planner.cluster.collective_seconds (the one collective cost rule)."""
    t = stream_seconds([op for op in ops if op.stream != "net"], hw)
    net = sum(collective_seconds(op.collective, op.bytes, cluster) for op in ops if op.stream == "net")
    return max(max(t.values()), net)


def pass_costs(sz: LayerSizes, pl: Placement, role: str, hw: Hardware, *, lowest: bool = False,
               cluster: Cluster = SINGLE, fsdp: int = 1) -> tuple[float, float]:
    """Seconds of one layer's forward and backward pass in one micro-batch (0 backward below the block), each
    its busiest stream. `fsdp`: the world FSDP gathers each pass's weights over (1: none)."""
    b = Builder(2, fsdp_world=fsdp)
    pass_ops(b, pl, sz, role, "fwd", 0, None, sz.out_bytes, False)
    n_fwd = len(b.ops)
    f = overlapped_seconds(b.ops, hw, cluster)
    if role == "below":
        return f, 0.0
    pass_ops(b, pl, sz, role, "bwd", 0, None, sz.out_bytes, lowest)
    return f, overlapped_seconds(b.ops[n_fwd:], hw, cluster)


def layer_cost(sz: LayerSizes, pl: Placement, role: str, hw: Hardware, *, lowest: bool = False,
               cluster: Cluster = SINGLE, fsdp: int = 1) -> float:
    """Seconds of one layer in one micro-batch: forward pass, plus backward unless below the block; each pass
    costs its busiest stream."""
    return sum(pass_costs(sz, pl, role, hw, lowest=lowest, cluster=cluster, fsdp=fsdp))


def step_cost(sz: LayerSizes, pl: Placement, hw: Hardware, *, shards: int = 1, cluster: Cluster = SINGLE,
              gather: bool = True) -> float:
    """One layer's optimizer step and the transfers around it (on `shards` ranks: its shard, and the
    all-gather of the updated weights unless FSDP, `gather` False), busiest stream."""
    b = Builder(0)
    optimizer_ops(b, pl, sz, (), shards=shards, gather=gather)
    return overlapped_seconds(b.ops, hw, cluster)


def reduce_seconds(sz: LayerSizes, shard: bool, cluster: Cluster) -> float:
    """The data-parallel reduction of one trained layer's gradient per step (planner.schedule.reduce_ops):
    a reduce-scatter with sharded state, else an all-reduce; 0 on one GPU."""
    return collective_seconds("reduce_scatter" if shard else "all_reduce", sz.param_bytes, cluster)


def exposed_reduce_seconds(r: float, b: float) -> float:
    """What a layer's gradient reduction (r seconds) adds to a step beyond the backward it overlaps.

    A block's reductions run on the net stream in the order backward makes the gradients, from its top layer
    down, each overlapping the backward of the layers below it. With s alike layers (reduce r, backward b) the
    net stream ends r + (s-1) max(0, r - b) after the last backward: every layer adds max(0, r - b) (it hides
    behind one backward), and the block's lowest layer, which has no backward below it to hide behind, adds
    min(r, b) more (bottom_reduce_seconds). The simulator plays the real overlap."""
    return max(0.0, r - b)


def bottom_reduce_seconds(r: float, b_min: float) -> float:
    """The rest of the lowest trained layer's reduction (exposed_reduce_seconds): min(r, b), with b the
    cheapest backward any placement of that layer has, so it does not depend on the placement."""
    return min(r, b_min)


def switch_cost(sz: LayerSizes, tier: str, policy: str, hw: Hardware, *, shards: int = 1) -> float:
    """Moving one layer's optimizer state (one rank's shard of it) in and the previous block's out at a block
    switch."""
    keep = kept_tier(policy)
    if keep is None or tier == keep:
        return 0.0
    nbytes = shard_params(sz.params, shards) * STATE_BYTES
    return max(hw.link(keep.to_device[0]).io_seconds(nbytes), hw.link(keep.from_device[-1]).io_seconds(nbytes))
