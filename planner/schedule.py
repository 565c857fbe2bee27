"""The schedule: a plan turned into the ordered operations of one training step of each phase.

This list is the contract between the planner, the runtime and the simulator: the runtime executes exactly
these operations on their streams, waiting on their dependencies; the simulator times exactly these
operations. Each operation names its stream, its size (bytes, FLOPs or parameters) and what it allocates on
and frees from the device, so the same list yields a memory timeline.

A phase is the training of one block. Within one step of a phase, for each micro-batch: forward through every
layer (layers below the block save nothing; the block and the layers above it save activations for backward),
then backward from the head down to the block's first layer (weight gradients only inside the block). After
the last micro-batch the block's optimizer step runs on the tier its state lives on.

Weights that live off the device are loaded ahead of use, at most `window` streamed layers at a time (the
prefetch window), and evicted after use. The list is in issue order: a load stands before the compute op it
must overlap with, so a runtime that issues in list order prefetches.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from planner.costs import LayerSizes, layer_sizes
from planner.memory import (
    MASTER_BYTES,
    RECOMPUTE,
    STATE_BYTES,
    STATE_WINDOW,
    Tier,
    fsdp,
    kept_tier,
    plan_shards,
    shard_params,
    state_shards,
    static_device_bytes,
    weight_shard_bytes,
    window_layers,
)
from planner.plan import Placement, Plan
from planner.profile import ModelProfile

KINDS = ("read_weights", "load_weights", "forward", "offload_act", "evict", "fetch_act", "recompute", "backward",
         "grad_offload", "read_state", "optimizer_step", "write_state", "upload_weights", "write_weights",
         "save_state", "load_state", "reduce_grads", "gather_weights")


@dataclass(frozen=True, kw_only=True)
class Op:
    id: int
    name: str                 # e.g. "fwd L3 mb0": the name the runtime's and the simulator's traces share
    kind: str                 # one of KINDS
    stream: str               # compute | h2d | d2h | nvme_read | nvme_write | cpu_opt | net
    layer: int
    micro_batch: int = -1     # -1 for per-step operations
    bytes: int = 0            # bytes moved (transfers)
    flops: int = 0            # matmul FLOPs (compute)
    tokens: int = 0           # tokens per GEMM, for the efficiency curve
    traffic_bytes: int = 0    # bytes read and written by memory-bound kernels
    params: int = 0           # parameters an optimizer step updates
    tier: str = ""            # the other end of a transfer, or where an optimizer step runs
    alloc_bytes: int = 0      # device bytes allocated when the op starts
    free_bytes: int = 0       # device bytes freed when the op ends
    transient_bytes: int = 0  # device bytes held only while the op runs
    mem_class: str = ""       # what alloc_bytes/free_bytes are: prefetch | activations | grads | workspace
    collective: str = ""      # net ops: all_reduce | reduce_scatter | all_gather over every rank (planner.cluster);
                              # `bytes` is the full buffer's size, its wire bytes are cluster.wire_bytes
    deps: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PhaseSchedule:
    block: int
    layers: tuple[int, ...]                     # the block's layers
    static: dict = field(default_factory=dict)  # device bytes held for the whole phase, by class
    ops: tuple[Op, ...] = ()
    switch_ops: tuple[Op, ...] = ()             # moving optimizer state in when the phase starts


@dataclass(frozen=True, kw_only=True)
class Schedule:
    phases: tuple[PhaseSchedule, ...]
    sizes: tuple[LayerSizes, ...]
    window_layers: int


def role(plan: Plan, block: int, layer: int) -> str:
    """below: forward only, nothing saved; active: trained; above: backward for the chain rule only."""
    b = plan.blocks[block]
    if b.first <= layer <= b.last:
        return "active"
    if layer < b.first:
        return "below"
    return "above"


def priced_as(plan: Plan, block: int, layer: int) -> tuple[Placement, str]:
    """(placement, role) a layer's passes are built and priced with in a phase: its own, except a tied model's
    head while the embedding's block trains without it. The head then forms the tied matrix's weight gradient
    too (runtime.model.TiedMatrix), so its passes are those of a trained layer, its gradient kept on the device
    until the embedding's backward adds it (build_phase), and no optimizer step: the embedding's holds the matrix."""
    bl, head = plan.blocks[block], plan.n_layers - 1
    if plan.model.tie_embeddings and bl.first == 0 and bl.last < head and layer == head:
        return replace(plan.placement(layer), grads=Tier.GPU), "active"
    return plan.placement(layer), role(plan, block, layer)


class Builder:
    """Appends ops with ids; `emit` returns the new op's id. Tracks the prefetch window across the phase."""

    def __init__(self, window: int, *, flat_grads: bool = False, fsdp_world: int = 1):
        self.ops: list[Op] = []
        # data parallel: a trained layer's device gradients are views of one zeroed flat bucket from the step's
        # start (runtime.reducer), so every micro-batch's gradient, the first too, is added into it
        self.flat_grads = flat_grads
        self.window = window          # streamed layers resident at once
        self.fsdp_world = fsdp_world  # > 1: FSDP over that many ranks (pass_ops gathers every layer's weights)
        self.evicts: list[int] = []   # evict op ids of streamed layers, in order
        self.computes: list[int] = []
        self.offloads: dict[tuple[int, int], int] = {}   # (layer, micro-batch) -> offload_act op id
        self.grads: dict[int, list[int]] = {}            # layer -> grad_offload op ids
        self.outstanding: list[int] = []                 # device-to-host copies not yet waited for

    def emit(self, **kw) -> int:
        if kw["stream"] == "compute" and kw["kind"] != "evict" and len(self.outstanding) > 1:
            # At most two device-to-host copies in flight: a compute op that could start a third waits for
            # the older ones, so offloaded activations and gradients cannot pile up on the device.
            kw["deps"] = tuple(kw.get("deps", ())) + tuple(self.outstanding[:-1])
            self.outstanding = self.outstanding[-1:]
        op = Op(id=len(self.ops), **kw)
        self.ops.append(op)
        if op.stream == "d2h" and op.free_bytes:
            self.outstanding.append(op.id)
        return op.id

    def window_deps(self) -> tuple[int, ...]:
        """A new streamed load waits until the layer `window` loads back is evicted."""
        k = len(self.evicts) - self.window
        return (self.evicts[k],) if k >= 0 and self.window else ()


def pass_ops(b: Builder, pl: Placement, sz: LayerSizes, role_: str, pass_: str, mb: int, prev: int | None,
             in_bytes: int, lowest: bool) -> int:
    """Emit one layer's ops for one pass (fwd or bwd); returns the id of its compute op.

    Device memory: forward allocates the output (and what it saves, unless recomputed) and frees its input
    unless the input is the checkpoint a recomputed layer keeps; backward frees what was saved and the incoming
    gradient and allocates the gradient for the layer below (not for the lowest layer of the pass)."""
    tag = f"L{sz.index} mb{mb}"
    deps: list[int] = [] if prev is None else [prev]
    n = b.fsdp_world
    # FSDP: each rank holds its shard of every layer (on its weights tier) and all-gathers the whole layer for
    # each pass, within the prefetch window like a streamed load; the shard is loaded first if it lives off the
    # device. The gathered copy and the loaded shard are evicted after the pass.
    w_bytes = weight_shard_bytes(sz.param_bytes, sz.params, n)   # what the tier holds: the layer, or a shard
    streamed = pl.weights != Tier.GPU or n > 1
    held = (sz.param_bytes if n > 1 else 0) + (w_bytes if pl.weights != Tier.GPU else 0)   # freed by evict
    if streamed:
        wdeps = b.window_deps()
        if pl.weights == Tier.NVME:
            wdeps = (b.emit(name=f"read {tag} {pass_}", kind="read_weights", stream="nvme_read", layer=sz.index,
                            micro_batch=mb, bytes=w_bytes, tier=Tier.NVME, deps=wdeps),)
        if pl.weights != Tier.GPU:
            wdeps = (b.emit(name=f"load {tag} {pass_}", kind="load_weights", stream="h2d", layer=sz.index,
                            micro_batch=mb, bytes=w_bytes, tier=pl.weights, alloc_bytes=w_bytes,
                            mem_class="prefetch", deps=wdeps),)
        if n > 1:
            wdeps = (b.emit(name=f"gather {tag} {pass_}", kind="gather_weights", stream="net", layer=sz.index,
                            micro_batch=mb, bytes=sz.param_bytes, tier=pl.weights, collective="all_gather",
                            alloc_bytes=sz.param_bytes, mem_class="prefetch", deps=wdeps),)
        deps.extend(wdeps)
    saved = sz.saved(role_)
    recompute = pl.activations == RECOMPUTE and role_ != "below"
    if pass_ == "fwd":
        kept = 0 if role_ == "below" or recompute else saved
        c = b.emit(name=f"fwd {tag}", kind="forward", stream="compute", layer=sz.index, micro_batch=mb,
                   flops=sz.fwd_flops, tokens=sz.tokens, traffic_bytes=sz.traffic_bytes,
                   alloc_bytes=sz.out_bytes + kept, free_bytes=0 if recompute else in_bytes,
                   transient_bytes=sz.nograd_workspace_bytes if recompute else sz.fwd_workspace(role_),
                   mem_class="activations", deps=tuple(deps))
        if kept and pl.activations == Tier.CPU:
            b.offloads[(sz.index, mb)] = b.emit(
                   name=f"offload {tag}", kind="offload_act", stream="d2h", layer=sz.index, micro_batch=mb,
                   bytes=saved, tier=Tier.CPU, free_bytes=saved, mem_class="activations", deps=(c,))
    else:
        if pl.activations == Tier.CPU and saved:
            # Fetched back one layer ahead of its backward, once it has been offloaded.
            ahead = tuple(b.computes[-2:-1]) + (b.offloads[(sz.index, mb)],)
            deps.append(b.emit(name=f"fetch {tag}", kind="fetch_act", stream="h2d", layer=sz.index,
                               micro_batch=mb, bytes=saved, tier=Tier.CPU, alloc_bytes=saved,
                               mem_class="activations", deps=ahead))
        if recompute:
            deps = [b.emit(name=f"recompute {tag}", kind="recompute", stream="compute", layer=sz.index,
                           micro_batch=mb, flops=sz.fwd_flops, tokens=sz.tokens, traffic_bytes=sz.traffic_bytes,
                           alloc_bytes=saved, transient_bytes=sz.fwd_workspace(role_), mem_class="activations",
                           deps=tuple(deps))]
        grads_off = role_ == "active" and pl.grads == Tier.CPU
        # the first micro-batch's gradient becomes the .grad, unless a flat bucket is there already (FSDP: the
        # layer's whole gradient is made, then reduce-scattered each micro-batch into the rank's shard)
        accumulates = role_ == "active" and pl.grads == Tier.GPU and (mb > 0 or b.flat_grads) and n == 1
        g_shard = weight_shard_bytes(sz.param_bytes, sz.params, n)
        grad_bytes = (sz.param_bytes if grads_off or n > 1 else 0) if role_ == "active" else 0
        c = b.emit(name=f"bwd {tag}", kind="backward", stream="compute", layer=sz.index, micro_batch=mb,
                   flops=sz.bwd(role_), tokens=sz.tokens, traffic_bytes=2 * sz.traffic_bytes,
                   alloc_bytes=(0 if lowest else in_bytes) + grad_bytes,
                   free_bytes=saved + sz.out_bytes + (in_bytes if recompute else 0),
                   # a gradient added into the block's existing one is a temporary first (AccumulateGrad)
                   transient_bytes=sz.bwd_workspace(role_) + (sz.param_bytes if accumulates else 0),
                   mem_class="activations", deps=tuple(deps))
        made = c
        if n > 1 and role_ == "active":
            made = b.emit(name=f"reduce {tag}", kind="reduce_grads", stream="net", layer=sz.index, micro_batch=mb,
                          bytes=sz.param_bytes, tier=Tier.GPU, collective="reduce_scatter",   # before any offload
                          free_bytes=sz.param_bytes - (g_shard if grads_off else 0), mem_class="activations",
                          deps=(c,))
            b.grads.setdefault(sz.index, []).append(made)
            grad_bytes = g_shard
        if grads_off:
            b.grads.setdefault(sz.index, []).append(b.emit(
                   name=f"grad {tag}", kind="grad_offload", stream="d2h", layer=sz.index, micro_batch=mb,
                   bytes=grad_bytes, tier=Tier.CPU, free_bytes=grad_bytes, mem_class="activations", deps=(made,)))
    b.computes.append(c)
    if streamed:
        b.evicts.append(b.emit(name=f"evict {tag} {pass_}", kind="evict", stream="compute", layer=sz.index,
                               micro_batch=mb, free_bytes=held or sz.param_bytes, mem_class="prefetch",
                               deps=(c,)))
    return c


def optimizer_ops(b: Builder, pl: Placement, sz: LayerSizes, deps: tuple[int, ...], *,
                  shards: int = 1, gather: bool = True) -> tuple[int, ...]:
    """Emit one layer's optimizer step and the transfers around it; returns the ids of the ops after which the
    layer's host copies (its NVMe state read into host RAM, its updated weights) are no longer read.

    With `shards` > 1 (sharded state) each rank steps its 1/shards of the layer's parameters (planner.memory
    .shard_params) and an all-gather then brings every rank the whole updated bf16 weights (`gather`; FSDP keeps
    its shard of the weights and gathers them in the next pass instead, so its transfers of updated weights move
    only the shard). A gather of weights that do not stay on the device lands in a whole-layer device buffer for
    its length: a transient."""
    tier = pl.master
    p = shard_params(sz.params, shards)
    w = sz.param_bytes if gather else weight_shard_bytes(sz.param_bytes, sz.params, shards)   # updated bytes moved
    tag = f"L{sz.index}"
    d = deps
    if tier == Tier.NVME:
        d = (b.emit(name=f"read state {tag}", kind="read_state", stream="nvme_read", layer=sz.index,
                    bytes=p * STATE_BYTES, tier=Tier.NVME, deps=deps),)
    stream = "compute" if tier == Tier.GPU else "cpu_opt"
    step = b.emit(name=f"adam {tag}", kind="optimizer_step", stream=stream, layer=sz.index, params=p, tier=tier,
                  transient_bytes=p * MASTER_BYTES if tier == Tier.GPU else 0, mem_class="workspace", deps=d)
    done = [step]
    if tier == Tier.NVME:
        done.append(b.emit(name=f"write state {tag}", kind="write_state", stream="nvme_write", layer=sz.index,
                           bytes=p * STATE_BYTES, tier=Tier.NVME, deps=(step,)))
    if shards > 1 and gather:
        on_device = tier == Tier.GPU and pl.weights != Tier.GPU
        step = b.emit(name=f"gather {tag}", kind="gather_weights", stream="net", layer=sz.index,
                      bytes=sz.param_bytes, tier=tier, collective="all_gather",
                      transient_bytes=sz.param_bytes if on_device else 0, mem_class="workspace", deps=(step,))
        done.append(step)
    if tier != Tier.GPU and pl.weights == Tier.GPU:
        done.append(b.emit(name=f"upload {tag}", kind="upload_weights", stream="h2d", layer=sz.index,
                           bytes=w, tier=Tier.CPU, deps=(step,)))
    last = step
    if tier == Tier.GPU and pl.weights != Tier.GPU:
        last = b.emit(name=f"writeback {tag}", kind="write_weights", stream="d2h", layer=sz.index,
                      bytes=w, tier=Tier.CPU, deps=(step,))
        done.append(last)
    if pl.weights == Tier.NVME:
        done.append(b.emit(name=f"writeback nvme {tag}", kind="write_weights", stream="nvme_write", layer=sz.index,
                           bytes=w, tier=Tier.NVME, deps=(last,)))
    return tuple(done)


def reduce_ops(b: Builder, plan: Plan, sizes, layers) -> tuple[int, ...]:
    """Data parallel over several ranks: once a trained layer's last backward has made its gradient (and it has
    reached the host, if offloaded), the layer's gradient is reduced over every rank as one flat bucket on the
    `net` stream, overlapping the backward of the layers below. Frozen layers send nothing. With sharded state
    a reduce-scatter leaves each rank the sum of its shard; else an all-reduce leaves every rank the sum.
    The bucket is the layer's gradient itself, held flat (the runtime allocates a layer's gradients as views of
    one buffer), so reducing it in place needs no device bytes. Returns the ids of the reduce ops."""
    if plan.world <= 1 or fsdp(plan):   # FSDP reduce-scatters every micro-batch's gradient in pass_ops
        return ()
    last_mb = plan.shape.grad_accum - 1
    out = []
    for i in layers:
        pl, sz = plan.placement(i), sizes[i]
        made = [op.id for op in b.ops if op.layer == i and op.micro_batch == last_mb
                and op.kind in ("backward", "grad_offload")]
        out.append(b.emit(name=f"reduce L{i}", kind="reduce_grads", stream="net", layer=i,
                          bytes=sz.param_bytes, tier=pl.grads,
                          collective="reduce_scatter" if plan.shard_state else "all_reduce",
                          deps=tuple(made)))
    return tuple(out)


def _switch_ops(plan: Plan, sizes, layers) -> tuple[Op, ...]:
    """Optimizer state brought in when a phase starts and the previous block's sent out, per the policy.
    With `reset` nothing moves: the new block's state starts at zero."""
    b = Builder(0)
    if plan.switch_state == "reset" or len(plan.blocks) == 1:
        return ()
    keep = kept_tier(plan.switch_state)
    src, dst = keep.to_device[0], keep.from_device[-1]   # the kept tier's own links out and in
    for i in layers:
        pl, nbytes = plan.placement(i), sizes[i].params * STATE_BYTES
        if pl.master == keep:
            continue  # the state already lives where it is kept
        b.emit(name=f"load state L{i}", kind="load_state", stream=src, layer=i, bytes=nbytes, tier=keep)
        b.emit(name=f"save state L{i}", kind="save_state", stream=dst, layer=i, bytes=nbytes, tier=keep)
    return tuple(b.ops)


def build_phase(plan: Plan, sizes, block: int, window: int) -> PhaseSchedule:
    n = plan.n_layers
    bl = plan.blocks[block]
    priced = [priced_as(plan, block, i) for i in range(n)]
    b = Builder(window, flat_grads=plan.world > 1, fsdp_world=plan.world if fsdp(plan) else 1)
    prev = None
    for mb in range(plan.shape.grad_accum):
        for i in range(n):
            in_bytes = sizes[i - 1].out_bytes if i else 0
            prev = pass_ops(b, priced[i][0], sizes[i], priced[i][1], "fwd", mb, prev, in_bytes, False)
        for i in range(n - 1, bl.first - 1, -1):
            in_bytes = sizes[i - 1].out_bytes if i else 0
            prev = pass_ops(b, priced[i][0], sizes[i], priced[i][1], "bwd", mb, prev, in_bytes, i == bl.first)
    if priced[-1][1] != role(plan, block, n - 1):  # a tied head's gradient waits for the embedding's backward
        for mb in range(plan.shape.grad_accum):
            h, e = (next(op for op in b.ops if op.kind == "backward" and op.layer == i and op.micro_batch == mb)
                    for i in (n - 1, 0))
            b.ops[h.id] = replace(h, alloc_bytes=h.alloc_bytes + sizes[-1].param_bytes)
            b.ops[e.id] = replace(e, free_bytes=e.free_bytes + sizes[-1].param_bytes)
    # Every step waits for the last backward and for every gradient of the block to reach the host: the first step
    # clips by the block's global gradient norm. A host-stepped layer starts (its NVMe state read, or its step)
    # only once the one STATE_WINDOW host-stepped layers before is done (state written back, new weights sent
    # on): host RAM holds that many layers' optimizer buffers at once (planner.memory.step_host_bytes).
    grads = tuple(g for i in bl.layers for g in b.grads.get(i, ()))
    grads += reduce_ops(b, plan, sizes, bl.layers)
    released: list[tuple[int, ...]] = []
    shards = state_shards(plan)
    for i in bl.layers:
        pl = plan.placement(i)
        host = pl.master != Tier.GPU
        window = released[-STATE_WINDOW] if host and len(released) >= STATE_WINDOW else ()
        done = optimizer_ops(b, pl, sizes[i], (prev,) + grads + window, shards=shards, gather=not fsdp(plan))
        if host:
            released.append(done)
    static = static_device_bytes(plan.placements, bl.layers, [s.params for s in sizes],
                                 [s.param_bytes for s in sizes], **plan_shards(plan))
    return PhaseSchedule(block=block, layers=tuple(bl.layers), static=static,
                         ops=_issue_order(b.ops), switch_ops=_switch_ops(plan, sizes, bl.layers))


def _issue_order(ops: list[Op]) -> tuple[Op, ...]:
    """Move every load, NVMe read and activation fetch up to just after the op it waits for last, so a runtime
    that issues in list order starts it as early as the window allows. Ids follow list order."""
    movers = {"read_weights", "load_weights", "fetch_act", "reduce_grads", "gather_weights"}
    after: dict[int, list[Op]] = {}
    head: list[Op] = []
    for op in ops:
        if op.kind in movers:
            (after.setdefault(max(op.deps), []) if op.deps else head).append(op)
    order: list[Op] = []

    def put(op: Op) -> None:
        order.append(op)
        for m in after.get(op.id, ()):
            put(m)
    for op in head:
        put(op)
    for op in ops:
        if op.kind not in movers:
            put(op)
    renum = {op.id: k for k, op in enumerate(order)}
    return tuple(replace(op, id=renum[op.id], deps=tuple(sorted(renum[d] for d in op.deps))) for op in order)


def build_schedule(plan: Plan, profile: ModelProfile, *, window: int | None = None) -> Schedule:
    """The plan's ops, sized by `profile`. `window`: streamed layers resident at once, when it must be another
    schedule's (the runtime sizes a float32 run with the float32 profile, on the plan's bf16 window)."""
    s = plan.shape
    sizes = tuple(layer_sizes(lp, s.micro_batch, s.seq_len) for lp in profile.layers)
    wl = window_layers(plan, sizes) if window is None else window
    phases = tuple(build_phase(plan, sizes, k, wl) for k in range(len(plan.blocks)))
    return Schedule(phases=phases, sizes=sizes, window_layers=wl)


def memory_timeline(phase: PhaseSchedule) -> tuple[int, dict, list[int]]:
    """Replay the ops in issue order: (peak bytes, breakdown at the peak, device bytes after each op).

    A copy off the device frees its source only once an op that waits for it starts (or at the end of the
    step): in between, on a real clock, the copy may still be running. That keeps the replay an upper bound."""
    live = dict(phase.static)
    for k in ("prefetch", "activations", "grads", "workspace"):
        live.setdefault(k, 0)
    peak, at_peak, trace = -1, {}, []
    deferred: dict[int, Op] = {}
    for op in phase.ops:
        for d in op.deps:
            done = deferred.pop(d, None)
            if done is not None:
                live[done.mem_class] -= done.free_bytes
        if op.alloc_bytes:
            live[op.mem_class] += op.alloc_bytes
        total = sum(live.values()) + op.transient_bytes
        if total > peak:
            peak, at_peak = total, dict(live, workspace=live["workspace"] + op.transient_bytes)
        if op.free_bytes and op.stream == "d2h":
            deferred[op.id] = op
        elif op.free_bytes:
            live[op.mem_class] -= op.free_bytes
        trace.append(sum(live.values()))
    for done in deferred.values():
        live[done.mem_class] -= done.free_bytes
    if trace:
        trace[-1] = sum(live.values())
    return peak, at_peak, trace
