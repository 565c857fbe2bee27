"""Data-parallel gradients of the active block: one flat bucket per trained layer, reduced over the ranks with
async collectives while the backward of the layers below runs; the optimizer waits on the work handles.

The schedule says when (planner.schedule.reduce_ops): a layer's `reduce_grads` op on the `net` stream follows its
last micro-batch's backward (and its gradient offload, when the plan keeps gradients on the host), and every
optimizer step of the block waits for all of them (the global-norm clip needs the whole block). The bucket is the
layer's gradient itself: on the device, the trainer points each trained parameter's .grad at a view of one
zeroed flat buffer at the start of a step, so autograd accumulates into it in place and the collective reads it
with no copy; on the host the optimizer's fp32 accumulator is already flat. The net op issues the collective
(`async_op=True`; on CUDA under the net stream's context, so NCCL waits only for this layer's backward, not for
the compute stream's later work), then waits on its handle (`finish`: on the CPU the net thread blocks until the
collective is done, on CUDA the net stream waits for NCCL's), so the op's span in the trace is the collective's
time, and the net stream is a FIFO of collectives as the simulator times it, while the compute stream runs the
backward of the layers below. `wait_all`, called by the block's first optimizer step, waits on the handles too
(on CUDA the stream that steps waits for NCCL's) and divides by the world size (sum / N: gloo has no AVG).
Collectives are issued in the schedule's list order by the one net thread, so every rank issues the same
sequence.

Unsharded state: all-reduce, every rank holds the mean gradient and steps the whole layer (the same arithmetic on
every rank, so the weights stay identical). Sharded state (plan.shard_state): reduce-scatter, rank r holds the
mean of its shard, elements [r k, (r + 1) k) of the flat buffer padded to N k with k = memory.shard_params(numel,
N); AdamW steps that shard and the `gather_weights` op all-gathers the updated weights. torch's gloo backend has
reduce_scatter (reduce_scatter_single / _tensor) in the versions we run; where a gloo build lacks it (older
torch raised "not supported" on CPU), `_reduce_scatter` falls back to an all-reduce of the whole bucket and keeps
its slice: still one torch.distributed collective, twice the bytes, counted as such in the trace.

Bytes in the trace: each net op's span carries what this rank sends, planner.cluster.wire_bytes of the buffer it
actually reduced (its dtype and padding: fp32 on the CPU stand-in), the same rule the planner and the simulator
price. The step's scalar loss (one all-reduce of 4 bytes, so every rank reports the global loss) and, when
sharded, the global gradient norm (4 bytes) are not counted: they are not schedule ops.

Why not torch's DistributedDataParallel. DDP's Reducer is built for a fixed set of trained parameters, and BCD
changes that set every few steps: (1) DDP builds its buckets from the parameters that require grad when the model
is wrapped; a parameter frozen then is never registered, so when its block becomes active later its gradients are
never synchronised, and the ranks' weights silently diverge (the trained set at wrap time is all DDP ever syncs).
(2) Wrapping with everything trainable and find_unused_parameters=True makes DDP traverse the autograd graph
after every forward to mark the unused parameters, and it still all-reduces every bucket, zeros for the frozen
layers included: the whole model's gradient bytes per step instead of the active block's. (3) Re-wrapping at
every block switch rebuilds the buckets and re-broadcasts the module's state from rank 0 (the full weights, not
one block's gradients) each time. (4) DDP hooks autograd on the whole model's forward and backward; our runtime
runs one layer at a time through its own executor (detached inputs, streamed and evicted weights, recompute),
which DDP's single-backward assumption does not fit. Here only the active block's layers are bucketed, one bucket
per layer, placed by the schedule, and the frozen layers send nothing.
Checked on torch 2.13, 2 gloo ranks, two Linear(8, 8) layers: the second frozen at wrap time and unfrozen before
the backward ends with different gradients on the two ranks (never reduced); with both trainable,
find_unused_parameters=True and the first run under no_grad (as a layer below the block), DDP's comm hook saw
144 elements reduced, of which 72 were trained.
"""
from __future__ import annotations

import threading

import torch

from planner.cluster import wire_bytes
from planner.memory import shard_params
from runtime.dist import World, peer_lost


def _dist():
    import torch.distributed as dist
    return dist


class Reducer:
    """The active block's gradient buckets and their collectives, for one rank of `world`."""

    def __init__(self, *, world: World, layouts, device: torch.device, grad_dtype: torch.dtype, shard: bool):
        self.world, self.layouts, self.device, self.grad_dtype = world, layouts, device, grad_dtype
        self.shard = shard
        self.flat: dict[int, torch.Tensor] = {}      # device-tier gradient buckets of the active block
        self.shards: dict[int, torch.Tensor] = {}    # sharded: this rank's reduced shard of each bucket
        self.works: dict[int, object] = {}           # layer -> async work handle
        self.reduced: dict[int, torch.Tensor] = {}   # layer -> what the work leaves the sum in (averaged at wait)
        self.loss_work = None
        self.loss: torch.Tensor | None = None
        self.sent: dict[int, int] = {}               # net op id -> bytes this rank sent
        self._lock = threading.Lock()
        self._scatter = None                         # the reduce-scatter function, found on first use
        self.skip: set[int] = set()                  # ids of parameters never attached: a tied head's copy of the
                                                     # matrix, whose gradient a hook hands to the embedding's

    # -- sizes ---------------------------------------------------------------------------------------------------

    def shard_numel(self, layer: int) -> int:
        """k: this rank's slice of the layer's flat buffer (the whole buffer when the state is not sharded)."""
        n = self.layouts[layer].numel
        return shard_params(n, self.world.size) if self.shard else n

    def bucket_numel(self, layer: int) -> int:
        """The flat buffer's length: numel, padded to N k when sharded, so every rank's shard is alike."""
        return self.world.size * self.shard_numel(layer) if self.shard else self.layouts[layer].numel

    def shard_range(self, layer: int) -> tuple[int, int]:
        k = self.shard_numel(layer)
        return (self.world.rank * k, (self.world.rank + 1) * k) if self.shard else (0, k)

    # -- device buckets ------------------------------------------------------------------------------------------

    def begin_phase(self, layers) -> None:
        """Allocate the flat gradient bucket of each device-tier trained layer (the phase's static grads)."""
        for i in layers:
            self.flat[i] = torch.zeros(self.bucket_numel(i), dtype=self.grad_dtype, device=self.device)

    def end_phase(self) -> None:
        self.flat.clear()
        self.shards.clear()
        self.works.clear()
        self.reduced.clear()

    def zero(self) -> None:
        """Start of a step: every bucket back to zero (its views are the parameters' .grad once attached)."""
        for flat in self.flat.values():
            flat.zero_()

    def attach(self, layer: int, params) -> None:
        """Point each trained parameter's .grad at its view of the bucket, so autograd accumulates every
        micro-batch's gradient into the bucket in place. A streamed layer's parameters are attached each time
        its weights are bound (a .grad must match the parameter's shape when it is set; it survives the
        eviction that follows)."""
        for p, view in zip(params, self.layouts[layer].views(self.flat[layer])):
            if id(p) in self.skip or not p.requires_grad or p.shape != view.shape:
                continue
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view

    def device_grads(self, layer: int, params) -> torch.Tensor:
        """The layer's device bucket holding its gradients; a .grad autograd replaced (a tied head's hook hands
        a fresh tensor back) is copied in, and the parameter pointed at the bucket again."""
        flat = self.flat[layer]
        for p, view in zip(params, self.layouts[layer].views(flat)):
            if id(p) not in self.skip and p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                if p.shape == view.shape:
                    p.grad = view
        return flat

    # -- collectives (the net thread) ----------------------------------------------------------------------------

    def reduce(self, op_id: int, layer: int, flat: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        """Issue the layer's reduction (all-reduce, or reduce-scatter when sharded) without waiting; with `loss`
        (the step's first reduce) also the step's loss, so every rank reports the global mean."""
        dist = _dist()
        n = self.layouts[layer].numel
        if flat.numel() > n:
            flat[n:].zero_()   # the padding to N k (host accumulators are not zeroed there)
        try:
            if loss is not None:
                self.loss = loss
                self.loss_work = dist.all_reduce(loss, async_op=True)
            if self.shard:
                out = self.shards.get(layer)
                if out is None or out.device != flat.device or out.dtype != flat.dtype:
                    out = self.shards[layer] = torch.empty(self.shard_numel(layer), dtype=flat.dtype,
                                                           device=flat.device)
                self.works[layer], kind = self._reduce_scatter(out, flat)
            else:
                out = flat
                self.works[layer], kind = dist.all_reduce(flat, async_op=True), "all_reduce"
            self.reduced[layer] = out
        except RuntimeError as e:
            raise peer_lost(self.world, f"the gradient reduction of layer {layer}", e) from None
        self.sent[op_id] = wire_bytes(kind, flat.numel() * flat.element_size(), self.world.size)

    def _reduce_scatter(self, out: torch.Tensor, flat: torch.Tensor):
        dist = _dist()
        if self._scatter is None:
            native = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            try:
                return native(out, flat, async_op=True), "reduce_scatter"
            except RuntimeError as e:
                if "support" not in str(e).lower():
                    raise
                self._scatter = "all_reduce"   # this build's gloo lacks reduce_scatter: all-reduce and slice
        work = dist.all_reduce(flat, async_op=True)
        work.wait()   # the slice is taken now; the handle below is already complete
        k = out.numel()
        out.copy_(flat[self.world.rank * k:(self.world.rank + 1) * k])
        return work, "all_reduce"

    def finish(self, layer: int) -> None:
        """The net op waits for its collective (and the step's loss, issued with the first): see the docstring."""
        try:
            if self.loss_work is not None:
                self.loss_work.wait()
            self.works[layer].wait()
        except RuntimeError as e:
            raise peer_lost(self.world, f"the gradient reduction of layer {layer}", e) from None

    def wait_all(self) -> None:
        """The block's first optimizer step: wait for every reduction of the step and average (sum / N).
        On CUDA, NCCL's wait makes the calling thread's current stream wait, without blocking the host."""
        with self._lock:
            try:
                if self.loss_work is not None:
                    self.loss_work.wait()
                    self.loss.div_(self.world.size)
                    self.loss_work = None
                for layer in sorted(self.works):
                    self.works.pop(layer).wait()
                    self.reduced.pop(layer).div_(self.world.size)
            except RuntimeError as e:
                raise peer_lost(self.world, "waiting for the gradient reductions", e) from None

    def shard_grad(self, layer: int) -> torch.Tensor:
        """Sharded: this rank's averaged gradient shard of the layer (k elements)."""
        return self.shards[layer]

    def global_norm(self, local: torch.Tensor) -> torch.Tensor:
        """Sharded: the block's gradient norm over every rank's shards, sqrt(sum over ranks of local^2). Called
        by the first optimizer step; the net thread has issued every reduce before and issues no gather until
        a step is done, so every rank issues this all-reduce at the same place in its sequence."""
        sq = (local.detach().to(torch.float32) ** 2).reshape(1)
        try:
            _dist().all_reduce(sq)
        except RuntimeError as e:
            raise peer_lost(self.world, "the gradient norm's all-reduce", e) from None
        return sq.sqrt().reshape(()).to(local.dtype)

    def gather(self, op_id: int, layer: int, shard: torch.Tensor) -> torch.Tensor:
        """All-gather the updated shards into the layer's whole flat weights (N k, padded); waits for it (on
        CUDA: the calling thread's current stream waits)."""
        full = torch.empty(self.world.size * shard.numel(), dtype=shard.dtype, device=shard.device)
        dist = _dist()
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            fn(full, shard, async_op=True).wait()
        except RuntimeError as e:
            raise peer_lost(self.world, f"the weight all-gather of layer {layer}", e) from None
        self.sent[op_id] = wire_bytes("all_gather", full.numel() * full.element_size(), self.world.size)
        return full
