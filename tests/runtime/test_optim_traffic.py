"""The cost model's device-tier AdamW traffic (planner.hardware.DEVICE_ADAM_TRAFFIC_BYTES) is the runtime's.

The expected figure is counted from the aten ops the runtime's step actually runs (a dispatch mode sees every
kernel with its operands), not from the constant's own derivation: each op reads its distinct tensor operands
once and writes its result (an in-place op writes its first operand, a copy does not read it); views move
nothing. The op is the step and the copy of the new weights into the layer's resident ones, as the engine makes
it. The step runs on the CPU with CUDA's dtypes (bf16 weights and gradients, fp32 state), so it makes the same
passes as on a GPU.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from planner.hardware import DEVICE_ADAM_TRAFFIC_BYTES
from runtime.optim import AdamWConfig, BlockOptimizer
from runtime.store import FlatLayout, Target, TieredStore


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


class Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.name.startswith("aten::empty"):
            return out
        read = list(args[1:]) if func._schema.name == "aten::copy_" else list(args)   # a copy's target is not read
        ins = {(t.data_ptr(), t.nbytes): t.nbytes for t in _tensors(read + list((kwargs or {}).values()))}
        inplace = func._schema.name.endswith("_")
        written = sum(t.nbytes for t in _tensors(args[0])) if inplace else sum(t.nbytes for t in _tensors(out))
        self.bytes += sum(ins.values()) + written
        self.ops.append(func._schema.name)
        return out


def test_device_adam_traffic_is_the_runtimes_passes():
    target = Target(device=torch.device("cpu"), weight_dtype=torch.bfloat16)
    mod = torch.nn.Module()
    with torch.device("meta"):
        for name, n in (("a", 4096), ("b", 1024), ("c", 1024)):
            mod.register_parameter(name, torch.nn.Parameter(torch.empty(n)))
    layout = FlatLayout.of(mod)
    store = TieredStore(target=target, layouts=[layout], tiers=["gpu"], nvme_dir=None, window_layers=0)
    try:
        store.put(0, torch.randn(layout.numel).to(torch.bfloat16))
        opt = BlockOptimizer(cfg=AdamWConfig(), store=store, layouts=[layout], master_tiers=["gpu"],
                             grad_tiers=["gpu"], switch_state="reset")
        opt.states[0] = opt.fresh(0)
        grads = [torch.randn(s, dtype=torch.bfloat16) for s in layout.shapes]
        with Traffic() as t:   # the optimizer_step op of a device-resident layer (runtime.engine _apply_new)
            new, _ = opt.step_layer(0, grads, 1e-3)
            store.resident(0).copy_(new)
    finally:
        store.close()
    per_param = t.bytes / layout.numel
    assert abs(per_param - DEVICE_ADAM_TRAFFIC_BYTES) < 1, (per_param, t.ops)   # a count: equal to the byte
