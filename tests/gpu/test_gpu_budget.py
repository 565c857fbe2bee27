"""On a real card: the runtime's budget cap (runtime/device.py) bounds PyTorch's allocator. Skipped without CUDA."""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime"))
from test_equivalence import tiny_plan  # noqa: E402

from runtime.device import hold_budget  # noqa: E402


def test_the_allocator_refuses_more_than_the_plans_budget():
    plan = tiny_plan()                     # planned for a 1 GiB budget
    total = torch.cuda.get_device_properties(0).total_memory
    free, _ = torch.cuda.mem_get_info(0)
    try:
        cap = hold_budget(plan, 0)
        assert cap.fraction == plan.budget_bytes / total and cap.card.total_bytes == total
        assert abs(cap.card.free_bytes - free) <= 256 << 20
        within = torch.empty(plan.budget_bytes // 2, dtype=torch.uint8, device="cuda")
        del within
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(plan.budget_bytes + (64 << 20), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
