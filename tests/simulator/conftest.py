"""Shared fixtures' helper for the simulator tests: a planned model written as a plan file."""
from __future__ import annotations

import pytest

from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.plan import write_atomic
from planner.planning import Request, make_plan
from planner.profile import profile_model


def write_plan(tmp_path_factory, model: str, gpu: str, **request):
    """Plan `model` on `gpu` and write it; returns (plan, path). The search is bounded by 0.5 deterministic
    seconds of work, so the plan is the same under any load."""
    cfg = CATALOG[model]
    plan = make_plan(cfg, make_hardware(gpu=gpu), Request(work_limit=0.5, **request), profile_model(cfg))
    path = tmp_path_factory.mktemp("plans") / f"{model}-{gpu}.json"
    write_atomic(str(path), plan.to_json())
    return plan, str(path)


@pytest.fixture(scope="session")
def plan_file(tmp_path_factory):
    """plan_file(model, gpu, **request) -> (plan, path)."""
    return lambda model, gpu, **request: write_plan(tmp_path_factory, model, gpu, **request)
