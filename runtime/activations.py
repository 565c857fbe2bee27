"""What a layer's forward saves for its backward, and where it waits: kept, recomputed, or offloaded to the host.

The trainer runs the model one layer at a time: each layer's forward gets a detached input, and its backward is
torch.autograd.backward(output, grad_output). In between, what autograd saved stays on the device (kept), is
never made (recomputed: the forward runs under no_grad and again, with grad, from its saved input just before the
backward), or is copied to pinned host memory after the forward and fetched back ahead of the backward (offloaded).

Saved tensors are captured with torch.autograd.graph.saved_tensors_hooks. A SavedSet dedups them by storage, as the
planner's profile does, so the bytes it counts are the bytes the plan predicted; the layer's own weights (views of
its flat weight buffer) are never counted nor moved: the store owns them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from planner.memory import RECOMPUTE, Tier
from planner.profile import live_bytes_tracker
from runtime.hostio import HostMemory

_PARAM = "param"


class SavedSet:
    """One layer's saved tensors for one micro-batch. `offload=False`: tensors stay where they are (counted);
    `offload=True`: pack returns a handle, and the storages can move to host memory and back.

    `weights()` returns the layer's flat weight buffer as bound now. A saved view of a weight is replaced by a
    marker and rebuilt at unpack from the buffer bound then: a streamed layer's forward copy is evicted after the
    forward and its backward uses the copy loaded again for it, so the graph never pins an evicted buffer."""

    def __init__(self, *, weights, offload: bool):
        self.weights = weights
        self.offload = offload
        self.keys: list[int] = []                    # storage keys in first-pack order
        self.device: dict[int, torch.Tensor] = {}    # key -> uint8 tensor over the device storage
        self.host: dict[int, torch.Tensor] = {}
        self.nbytes = 0
        self.count = 0                               # tensors packed (for tests: nothing saved below the block)

    def pack(self, t: torch.Tensor):
        s, w = t.untyped_storage(), self.weights()
        if s.data_ptr() == w.untyped_storage().data_ptr():
            return (_PARAM, t.dtype, t.shape, t.stride(), t.storage_offset())
        if t.device != w.device:
            return t  # host-side state a kernel keeps (an RNG seed): not device memory, stays where it is
        self.count += 1
        key = s.data_ptr()
        if key not in self.device:
            self.keys.append(key)
            self.device[key] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(s)
            self.nbytes += s.nbytes()
        if not self.offload:
            return t
        return (key, t.dtype, t.shape, t.stride(), t.storage_offset())

    def unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        key, dtype, shape, stride, offset = handle
        base = self.weights() if key == _PARAM else self.device[key]
        return torch.empty(0, dtype=dtype, device=base.device).set_(base.untyped_storage(), offset, shape, stride)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def to_host(self, pool: "HostBuffers", layer: int, stream=None) -> None:
        """Offload: copy every saved storage into the layer's pinned host buffer, one after the other, then let the
        device copies go. On CUDA this runs on the d2h stream; record_stream keeps the allocator from reusing the
        device memory before the copy has read it."""
        flat, at = pool.get(layer, self.nbytes), 0
        for key in self.keys:
            dev = self.device.pop(key)
            host = flat[at:at + dev.numel()]
            at += dev.numel()
            host.copy_(dev, non_blocking=stream is not None)
            if stream is not None:
                dev.record_stream(stream)
            self.host[key] = host

    def to_device(self, device: torch.device, stream=None) -> None:
        """Fetch: copy the host buffers back into fresh device storages (on CUDA, on the h2d stream)."""
        for key in self.keys:
            host = self.host.pop(key)
            dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
            dev.copy_(host, non_blocking=stream is not None)
            self.device[key] = dev

    def release(self, stream=None) -> None:
        """Drop the device storages after the backward (record_stream: the compute stream used them)."""
        if stream is not None:
            for dev in self.device.values():
                dev.record_stream(stream)
        self.device.clear()
        self.host.clear()


class HostBuffers:
    """Pinned host buffers for offloaded activations: one per layer, the size of the largest saved set it has
    held (its trainable one), reused by every micro-batch and step. A micro-batch's offload of a layer comes after
    the previous micro-batch's fetch of it was used by that layer's backward, so one buffer is enough, and
    pinning happens once. planner.memory counts one trainable saved set per offloaded layer."""

    def __init__(self, host: HostMemory):
        self.host = host
        self._bufs: dict[int, torch.Tensor] = {}

    def get(self, layer: int, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(layer)
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                self.host.release(self._bufs.pop(layer))
            buf = None  # the smaller buffer goes before the larger one comes
            buf = self._bufs[layer] = self.host.empty(nbytes, torch.uint8)
        return buf


def forward(layer, x: torch.Tensor, labels: torch.Tensor | None, *, grad: bool, saved: SavedSet | None,
            autocast: bool):
    """Run one layer's forward. grad=False: no graph, nothing saved (layers below the block, and the first pass
    of a recomputed layer). Otherwise saved-tensor hooks of `saved` capture what autograd keeps."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    hooks = saved.hooks() if (grad and saved is not None) else contextlib.nullcontext()
    with grad_ctx, amp, hooks:
        return layer(x, labels) if labels is not None else layer(x)


def backward(y: torch.Tensor, grad_out: torch.Tensor | None) -> None:
    """Backward through one layer's graph: weight gradients accumulate in .grad of its trainable parameters,
    the input's gradient lands in its detached input's .grad."""
    torch.autograd.backward(y, grad_out)


@dataclass
class Rec:
    """One layer's forward for one micro-batch, held until its backward."""
    x: torch.Tensor | None          # the detached input (its .grad is the gradient for the layer below)
    y: torch.Tensor | None          # the output with its graph (None while a recomputed layer waits)
    saved: SavedSet | None
    in_bytes: int


class ComputeOps:
    """The schedule's compute ops and activation transfers, for engine.PhaseOps (which holds the step's state:
    the layers and their bound weights, the micro-batches, and the records below).

    forward: the layer on a detached input, under no_grad below the block (nothing saved), else with its saved
    tensors kept, offloaded, or not made at all (recompute); recompute: the forward again, with grad, from the
    kept input; backward: torch.autograd.backward(output, gradient of the output), handing the input's gradient
    to the layer below. Each records the device bytes it allocates, holds only while it runs, and frees (mem),
    measured. What it holds only while it runs (kernel temporaries: intermediates of a no_grad forward, a
    gradient added into an existing one) is measured on the CPU stand-in with the profile's storage tracker,
    the same measurement the plan's workspace comes from, at the op's first run in the phase: every step of a
    phase runs the same ops on the same shapes, and the tracker's Python work per kernel would slow the step by
    about a fifth. On CUDA the allocator's max_memory_allocated is the measured peak and the tracker stays off."""

    @contextlib.contextmanager
    def _temporaries(self, op):
        """Measure the storages the enclosed kernels create and free again: booked as the op's transient bytes."""
        if not self.track_temporaries or op.id in self.transient:
            self.transient.setdefault(op.id, 0)
            yield
            return
        tracker = live_bytes_tracker(profiling=False)
        with tracker:
            yield
        self.transient[op.id] = tracker.peak - tracker.settle()

    def _saved_set(self, i: int, offload: bool) -> SavedSet:
        return SavedSet(weights=lambda: self.bound[i], offload=offload)

    def _run(self, i: int, mb: int, x, *, grad: bool, saved):
        y = forward(self.layers[i], x, self.labels[mb] if i == self.head else None, grad=grad, saved=saved,
                    autocast=self.target.cuda)
        return y / self.grad_accum if i == self.head else y

    def _forward(self, op, gpu) -> None:
        i, mb = op.layer, op.micro_batch
        x = self.tokens[mb] if i == 0 else self.outs.pop((i - 1, mb))
        in_bytes = 0 if i == 0 else x.nbytes
        self._bind(op)
        kept, mode = 0, self.plan.placement(i).activations
        if self.roles[i] == "below":
            with self._temporaries(op):
                y = self._run(i, mb, x, grad=False, saved=None)
        else:
            if i > 0:
                x = x.detach().requires_grad_(i > self.first)
            saved = None if mode == RECOMPUTE else self._saved_set(i, offload=(mode == Tier.CPU))
            with self._temporaries(op):
                y = self._run(i, mb, x, grad=saved is not None, saved=saved)
            self.recs[(i, mb)] = Rec(x=x, y=None if saved is None else y, saved=saved, in_bytes=in_bytes)
            if saved is not None:
                kept = saved.nbytes
                self.saved_tensors[i] += saved.count
        if i == self.head:
            self.loss += y.detach()
            out_bytes = 0  # the head's output is the scalar loss, not an activation (as the profile counts it)
        else:
            self.outs[(i, mb)] = y.detach() if y.requires_grad else y
            out_bytes = y.nbytes
        recomputed = mode == RECOMPUTE and self.roles[i] != "below"
        self.mem[op.id] = (out_bytes + kept, self.transient[op.id], 0 if recomputed else in_bytes)

    def _recompute(self, op, gpu) -> None:
        i, mb = op.layer, op.micro_batch
        self._bind(op)
        rec = self.recs[(i, mb)]
        rec.saved = self._saved_set(i, offload=False)
        with self._temporaries(op):
            rec.y = self._run(i, mb, rec.x, grad=True, saved=rec.saved)
        self.saved_tensors[i] += rec.saved.count
        self.mem[op.id] = (rec.saved.nbytes, self.transient[op.id], 0)

    def _backward(self, op, gpu) -> None:
        i, mb = op.layer, op.micro_batch
        self._bind(op)
        rec = self.recs.pop((i, mb))
        with self._temporaries(op):
            backward(rec.y, None if i == self.head else self.grad_out.pop((i, mb)))
        lowest = i == self.first
        if not lowest:
            self.grad_out[(i - 1, mb)] = rec.x.grad
        grad_bytes = 0
        if self.roles[i] == "active" and self.plan.placement(i).grads == Tier.CPU:
            params = [p for p in self.layers[i].parameters()]
            self.pending_grads[(i, mb)] = [p.grad for p in params]
            grad_bytes = sum(p.grad.nbytes for p in params if p.grad is not None)  # a tied head's copy: none
            for p in params:
                p.grad = None
        rec.saved.release(gpu)
        out_bytes = 0 if i == self.head else rec.y.nbytes
        recomputed = self.plan.placement(i).activations == RECOMPUTE
        self.mem[op.id] = ((0 if lowest else rec.in_bytes) + grad_bytes, self.transient[op.id],
                           rec.saved.nbytes + out_bytes + (rec.in_bytes if recomputed else 0))

    def _offload_act(self, op, gpu) -> None:
        self.recs[(op.layer, op.micro_batch)].saved.to_host(self.act_buffers, op.layer, gpu)

    def _fetch_act(self, op, gpu) -> None:
        self.recs[(op.layer, op.micro_batch)].saved.to_device(self.target.device, gpu)
