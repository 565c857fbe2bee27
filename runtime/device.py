"""Holding a plan's VRAM budget on CUDA: cap this process at the budget, and refuse a card that lacks the memory.

A plan is made for a budget (`plan.budget_bytes`, e.g. 24 GiB) and predicts the peak its schedule holds on the
device (`plan.predicted.peak_vram_bytes`, at most budget - reserve; the reserve is for the CUDA context and the
allocator's slack). Two things make the runtime keep to it on a larger card, or fail early on a busier one:

  - the cap: `torch.cuda.set_per_process_memory_fraction(budget / total)`. PyTorch's caching allocator then never
    holds more than the budget: an allocation past it frees cached blocks and retries, then raises out-of-memory,
    instead of quietly using the rest of an 80 GiB card the plan never counted on. (The CUDA context lives outside
    the allocator; the plan's reserve is what pays for it.) A budget above the card's memory caps at the card.
  - the check, before the runtime allocates anything: free memory on the card (`torch.cuda.mem_get_info`, after
    this process's cached blocks are handed back) must hold the plan's peak. Other processes on the card, or an
    earlier run in this one, can leave less; the run would then fail with out-of-memory at some step minutes in,
    so it is refused at once, with exit 2 and the two figures.

Everything that asks CUDA goes through a `CudaProbe`; tests pass a fake one, so CI checks the logic on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.errors import UserError

GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class CardMemory:
    """What a probe reports about one CUDA device."""
    name: str
    total_bytes: int
    free_bytes: int


class CudaProbe:
    """The three CUDA calls the budget needs (torch.cuda); a test's fake has the same two methods."""

    def memory(self, index: int) -> CardMemory:
        import torch
        torch.cuda.empty_cache()   # this process's cached, unused blocks count as free: they are ours to reuse
        free, total = torch.cuda.mem_get_info(index)
        return CardMemory(name=torch.cuda.get_device_name(index), total_bytes=int(total), free_bytes=int(free))

    def cap(self, fraction: float, index: int) -> None:
        import torch
        torch.cuda.set_per_process_memory_fraction(fraction, index)


@dataclass(frozen=True, kw_only=True)
class BudgetCap:
    """What hold_budget did: the fraction it set and the figures it compared."""
    device_index: int
    fraction: float
    budget_bytes: int
    need_bytes: int
    card: CardMemory


def hold_budget(plan, index: int, probe: CudaProbe | None = None) -> BudgetCap:
    """Refuse a card with less free memory than `plan` needs (UserError, exit 2), then cap this process's CUDA
    allocator at the plan's budget. Call it before the runtime allocates on the device."""
    probe = probe or CudaProbe()
    card = probe.memory(index)
    need, budget = plan.predicted.peak_vram_bytes, plan.budget_bytes  # the highest phase's peak
    if card.free_bytes < need:
        used = card.total_bytes - card.free_bytes
        raise UserError(
            f"GPU {index} ({card.name}) has {card.free_bytes / GIB:.2f} GiB free of {card.total_bytes / GIB:.2f} "
            f"GiB, but the plan needs {need / GIB:.2f} GiB on it at its peak (planned for a "
            f"{budget / GIB:.2f} GiB budget); {used / GIB:.2f} GiB is in use by other processes or earlier work. "
            f"Free the GPU, or plan again with --vram {max(card.free_bytes / GIB, 0.01):.2f} so the plan fits "
            f"what is free.")
    fraction = min(1.0, budget / card.total_bytes)
    probe.cap(fraction, index)
    return BudgetCap(device_index=index, fraction=fraction, budget_bytes=budget, need_bytes=need, card=card)


# A CUDA device name (torch.cuda.get_device_name) -> the catalog GPU it is, first match wins: every listed
# substring must appear in the lower-cased name with spaces and dashes removed.
_CATALOG_NAMES = ((("h200",), "h200"), (("h100", "pcie"), "h100-pcie"), (("h100",), "h100-sxm"),
                  (("a100", "40gb"), "a100-40g"), (("a100",), "a100-80g"), (("a800",), "a800-80g"),
                  (("l40s",), "l40s"), (("rtx5090",), "rtx5090"), (("rtx4090",), "rtx4090"),
                  (("rtx3090",), "rtx3090"))


def catalog_gpu(device_name: str) -> str | None:
    """The catalog GPU (planner/catalog/gpus) a CUDA device name is, or None: then calibrate the machine."""
    key = "".join(device_name.lower().replace("-", " ").split())
    return next((gpu for parts, gpu in _CATALOG_NAMES if all(p in key for p in parts)), None)
