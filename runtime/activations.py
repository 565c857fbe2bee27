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

import torch

from runtime.store import HostMemory

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
        s = t.untyped_storage()
        if s.data_ptr() == self.weights().untyped_storage().data_ptr():
            return (_PARAM, t.dtype, t.shape, t.stride(), t.storage_offset())
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

    def to_host(self, pool: "HostBuffers", tag: tuple, stream=None) -> None:
        """Offload: copy every saved storage into its pinned host buffer, then let the device copies go.
        On CUDA this runs on the d2h stream; record_stream keeps the allocator from reusing the device memory
        before the copy has read it."""
        for idx, key in enumerate(self.keys):
            dev = self.device.pop(key)
            host = pool.get(tag + (idx,), dev.numel())
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
    """Pinned host buffers for offloaded activations, exact sizes, reused step after step under the same tag
    (layer, micro-batch, storage index): the shapes repeat every step, so pinning happens once."""

    def __init__(self, host: HostMemory):
        self.host = host
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, tag: tuple, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(tag)
        if buf is None or buf.numel() != nbytes:
            if buf is not None:
                self.host.release(buf)
            buf = self._bufs[tag] = self.host.empty(nbytes, torch.uint8)
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
