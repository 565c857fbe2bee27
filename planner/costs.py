"""The one cost model: seconds of a schedule operation on given hardware, and bytes of a layer at a shape.

The ILP, the plan's predictions and the simulator all price operations here, so their numbers can be
compared. The ILP linearises: a layer's pass costs the largest of its per-stream sums (compute, host-to-device,
device-to-host, NVMe read, NVMe write, CPU optimizer), as if transfers overlapped perfectly with compute; the
simulator plays the same operations with their dependencies and is the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.hardware import Hardware
from planner.profile import LayerProfile

STREAMS = ("compute", "h2d", "d2h", "nvme_read", "nvme_write", "cpu_opt")

# Bytes per tensor class live in planner.memory, with every other memory rule.

@dataclass(frozen=True, kw_only=True)
class LayerSizes:
    """One layer's numbers at a (micro-batch, sequence) shape."""
    index: int
    kind: str
    params: int
    param_bytes: int
    tokens: int
    fwd_flops: int
    bwd_flops: int
    bwd_input_flops: int
    saved_bytes: int          # weights trainable
    saved_frozen_bytes: int   # weights frozen
    workspace_bytes: int          # the largest of the five below
    fwd_workspace_bytes: int      # weights trainable
    fwd_frozen_workspace_bytes: int
    nograd_workspace_bytes: int
    bwd_workspace_bytes: int      # weights trainable
    bwd_frozen_workspace_bytes: int
    traffic_bytes: int
    out_bytes: int

    def saved(self, role: str) -> int:
        return {"active": self.saved_bytes, "above": self.saved_frozen_bytes}.get(role, 0)

    def bwd(self, role: str) -> int:
        return {"active": self.bwd_flops, "above": self.bwd_input_flops}.get(role, 0)

    def fwd_workspace(self, role: str) -> int:
        """Kernel temporaries of a forward in this role (with grad for active and above, no_grad below)."""
        return {"active": self.fwd_workspace_bytes, "above": self.fwd_frozen_workspace_bytes}.get(
            role, self.nograd_workspace_bytes)

    def bwd_workspace(self, role: str) -> int:
        return {"active": self.bwd_workspace_bytes, "above": self.bwd_frozen_workspace_bytes}.get(role, 0)


def layer_sizes(lp: LayerProfile, micro_batch: int, seq_len: int) -> LayerSizes:
    b, s = micro_batch, seq_len

    def at(p) -> int:
        return int(round(p.at(b, s)))
    return LayerSizes(index=lp.index, kind=lp.kind, params=lp.params, param_bytes=lp.param_bytes, tokens=b * s,
                      fwd_flops=at(lp.fwd_flops), bwd_flops=at(lp.bwd_flops), bwd_input_flops=at(lp.bwd_input_flops),
                      saved_bytes=at(lp.saved_bytes), saved_frozen_bytes=at(lp.saved_frozen_bytes),
                      workspace_bytes=at(lp.workspace_bytes), fwd_workspace_bytes=at(lp.fwd_workspace_bytes),
                      fwd_frozen_workspace_bytes=at(lp.fwd_frozen_workspace_bytes),
                      nograd_workspace_bytes=at(lp.nograd_workspace_bytes),
                      bwd_workspace_bytes=at(lp.bwd_workspace_bytes),
                      bwd_frozen_workspace_bytes=at(lp.bwd_frozen_workspace_bytes),
                      traffic_bytes=at(lp.mem_traffic_bytes), out_bytes=at(lp.out_bytes))


def op_seconds(op, hw: Hardware) -> float:
    """Seconds one schedule operation takes alone on `hw` (no queueing): the simulator's unit of work."""
    if op.stream == "compute":
        if op.kind == "optimizer_step":
            return hw.adam_seconds(op.params, "gpu")
        return hw.matmul_seconds(op.flops, op.tokens) + hw.memory_seconds(op.traffic_bytes)
    if op.stream == "cpu_opt":
        return hw.adam_seconds(op.params, "cpu")
    return hw.link(op.stream).io_seconds(op.bytes)


def stream_seconds(ops, hw: Hardware) -> dict[str, float]:
    out = dict.fromkeys(STREAMS, 0.0)
    for op in ops:
        out[op.stream] += op_seconds(op, hw)
    return out


def overlapped_seconds(ops, hw: Hardware) -> float:
    """The ILP's linearisation of a group of operations: the busiest stream's total."""
    return max(stream_seconds(ops, hw).values())
