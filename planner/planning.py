"""From a model and hardware to a Plan: profile, solve the ILP for each micro-batch size, check, predict."""
from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass

from planner import ilp, memory, wear
from planner.costs import layer_sizes
from planner.errors import UserError
from planner.hardware import GIB, Hardware
from planner.infeasible import explain_infeasible
from planner.models import ModelConfig
from planner.plan import SCHEMA_VERSION, Block, PhasePrediction, Plan, Prediction, Shape, SolverReport, cycle_rate
from planner.profile import ModelProfile, profile_model
from planner.schedule import build_schedule, memory_timeline, priced_as


@dataclass(frozen=True, kw_only=True)
class Request:
    method: str = "bcd"
    vram_gib: float | None = None        # budget; default the GPU's VRAM
    reserve_gib: float = 1.5             # CUDA context + allocator slack, kept out of the budget
    seq_len: int = 2048
    batch: int = 8                       # sequences per optimizer step
    micro_batch: int | None = None       # fixed, or chosen by the planner among the divisors of batch
    steps_per_block: int = 50
    order: str = "ascending"
    seed: int = 0
    switch_state: str = "reset"
    time_limit_s: float = 10.0
    max_blocks: int | None = None
    min_blocks: int | None = None        # bcd: at least this many blocks (--blocks N sets both to N)
    max_nvme_write_bytes_per_day: float | None = None  # cap on NVMe wear (planner.wear); None: no cap
    train_embeddings: bool = False       # bcd: train the embedding and the head in blocks too (pretraining)


def candidates(req: Request) -> list[int]:
    if req.micro_batch:
        return [req.micro_batch]
    return [m for m in (1, 2, 4, 8, 16, 32) if req.batch % m == 0 and m <= req.batch]


def make_plan(cfg: ModelConfig, hw: Hardware, req: Request, profile: ModelProfile | None = None) -> Plan:
    prof = profile or profile_model(cfg)
    if req.seq_len > cfg.max_seq:
        raise UserError(f"--seq {req.seq_len} is longer than the model allows ({cfg.max_seq}).")
    if req.micro_batch and req.batch % req.micro_batch:
        raise UserError(f"--micro-batch {req.micro_batch} does not divide --batch {req.batch}.")
    if req.min_blocks and req.method == "full":
        raise UserError("--blocks / --min-blocks apply to --method bcd; full-parameter training is one block.")
    if req.min_blocks and req.min_blocks > min(cfg.layers, req.max_blocks or cfg.layers):
        raise UserError(f"at least {req.min_blocks} blocks asked for, but {cfg.name} has {cfg.layers} decoder "
                        f"layers" + (f" and --max-blocks is {req.max_blocks}" if req.max_blocks else "") +
                        ": a block holds one layer or more.")
    budget = int((req.vram_gib if req.vram_gib is not None else hw.gpu.vram_gib) * GIB)
    reserve = int(req.reserve_gib * GIB)
    if reserve >= budget:
        raise UserError(f"--reserve ({req.reserve_gib} GiB) must be smaller than the VRAM budget "
                        f"({budget / GIB:g} GiB).")
    cap = memory.device_cap_bytes(budget, reserve)
    room = cap + memory.host_usable_bytes(hw) + memory.nvme_usable_bytes(hw)
    weights = sum(lp.param_bytes for lp in prof.layers)
    if weights > room:
        raise UserError(
            f"no plan fits {cfg.name}: its {weights / GIB:.1f} GiB of bf16 weights do not fit in the device budget, "
            f"host RAM ({hw.host.ram_gib:g} GiB) and NVMe ({hw.host.nvme_gib:g} GiB) together, before any optimizer "
            f"state. Give more host RAM (--host-ram) or an NVMe tier (--nvme, e.g. --nvme 2TB).")
    for _attempt in range(4):
        found = search(prof, hw, req, cap)
        if found is None:
            raise explain_infeasible(prof, hw, req, budget, reserve)
        plan = _assemble(prof, hw, req, budget, reserve, found)
        over = max(p.peak_vram_bytes for p in plan.predicted.phases) - cap
        if over <= 0:
            return _within_write_cap(plan, prof, hw, req)
        cap -= over + (1 << 20)  # the schedule's replay found more than the ILP counted: tighten, solve again
    raise UserError("the planner could not make the schedule's memory fit the budget; raise --reserve or "
                    "the budget.")


def _within_write_cap(plan: Plan, prof: ModelProfile, hw: Hardware, req: Request) -> Plan:
    """`plan` if it writes no more to NVMe a day than the request's cap, else the best plan without NVMe.

    What a plan writes a day depends on its step time, known once it is assembled, so the cap is checked here on
    the predicted figure. Every NVMe placement is written while its block trains (optimizer state after each step,
    weights written back), so the plan that writes nothing is the one without the drive: it respects any cap. It
    is not always the fastest that does (a slower plan with fewer NVMe placements might also), which is why the
    message says what the cap cost."""
    cap = req.max_nvme_write_bytes_per_day
    per_day = plan.predicted.nvme_write_bytes_per_day
    if cap is None or per_day <= cap:
        return plan
    try:
        alt = make_plan(prof.model, dataclasses.replace(hw, host=dataclasses.replace(hw.host, nvme_gib=0.0)),
                        dataclasses.replace(req, max_nvme_write_bytes_per_day=None), profile=prof)
    except UserError as e:
        raise UserError(
            f"the fastest plan for {prof.model.name} writes {per_day / 1e12:,.2f} TB a day to NVMe, more than "
            f"--max-nvme-writes-per-day allows ({cap / 1e12:,.2f} TB), and without NVMe no plan fits ({e}). Raise "
            f"the cap, or give more host RAM so that optimizer state can stay off NVMe.") from None
    return dataclasses.replace(alt, hardware=hw)


@dataclass(frozen=True, kw_only=True)
class Search:
    micro_batch: int
    solution: ilp.Solution
    bound_s: float        # global lower bound on the best cycle cost (per optimizer step's micro-batches)
    solve_seconds: float
    solved: int           # subproblems solved
    candidates: int


def search(prof: ModelProfile, hw: Hardware, req: Request, cap: int) -> Search | None:
    """Every micro-batch candidate x every block count, as separate CP-SAT problems, best first.

    Pass 1 solves each briefly, best-first by a simple lower bound (which grows with the block count), until the
    smallest bound left cannot beat the incumbent or the time limit is reached with a plan in hand. Pass 2 gives
    more time to the problems whose proven bound is still below the incumbent, lowest bound first. The reported
    bound is valid for everything not closed."""
    n = prof.n_decoder
    started = time.perf_counter()
    quick = max(0.02, min(0.1, req.time_limit_s / 100))
    best = None                       # (cost, mb, solution)
    pending = []                      # (bound, mb, u, (tier, own), problem) not yet proven
    took, solved = 0.0, 0
    counts = [1] if req.method == "full" else list(range(req.min_blocks or 1, min(n, req.max_blocks or n) + 1))
    problems = {mb: _problem(prof, hw, req, mb, cap) for mb in candidates(req)}

    def record(sol, mb):
        """Count a solved subproblem and keep it if it is the best so far."""
        nonlocal best, took, solved
        solved += 1
        if sol is not None:
            took += sol.solve_seconds
            cost = sol.objective_s * (req.batch // mb)
            if sol.status != "UNKNOWN" and (best is None or cost < best[0]):
                best = (cost, mb, sol)
        return sol

    def out_of_time() -> bool:  # only once there is a plan to return
        return best is not None and time.perf_counter() - started >= req.time_limit_s

    open_bounds = []
    frontier = []                     # (bound, mb, (tier, own), index into counts): best-first over all subproblems
    tiers = memory.tiers(hw)
    for mb, pb in problems.items():
        # the state tier, and where a trained embedding and head go (ilp.layouts): separate subproblems
        for tier in [(t, own) for t in tiers for own in ilp.layouts(pb)]:
            # Finer partitions never need more memory (smaller block state, more activations at frozen
            # sizes), so feasibility is monotone in the block count: bisect for the fewest blocks that fit.
            lo_u = counts[0] if len(counts) == 1 else _fewest_blocks(pb, counts, tier, 10 * quick)
            solved += len(counts) > 1
            if lo_u is not None:
                k = counts.index(lo_u)
                heapq.heappush(frontier, (ilp.lower_bound(pb, lo_u, tier[0]) * (req.batch // mb), mb, tier, k))
    while frontier:
        lb, mb, tier, k = heapq.heappop(frontier)
        if best is not None and lb >= best[0]:
            break  # every subproblem left is bounded at least as high
        if out_of_time():
            open_bounds.append(lb)  # the smallest bound of everything left
            break
        pb, g, u = problems[mb], req.batch // mb, counts[k]
        sol = record(ilp.solve(pb, u, tier[0], own=tier[1], time_limit_s=quick), mb)
        if sol is not None and sol.status != "OPTIMAL":
            pending.append((max(sol.bound_s * g, lb), mb, u, tier, pb))
        if k + 1 < len(counts):  # the bound grows with the block count
            heapq.heappush(frontier, (ilp.lower_bound(pb, counts[k + 1], tier[0]) * g, mb, tier, k + 1))
    pending.sort(key=lambda x: x[0])
    for bound, mb, u, tier, pb in pending:
        left = req.time_limit_s - (time.perf_counter() - started)
        if best is not None and bound >= best[0] * (1 - 1e-9):
            continue
        if left <= 0.05:
            open_bounds.append(bound)
            continue
        sol = record(ilp.solve(pb, u, tier[0], own=tier[1], time_limit_s=left), mb)
        if sol is not None and sol.status != "OPTIMAL":
            open_bounds.append(max(bound, sol.bound_s * (req.batch // mb)))
    if best is None:
        return None
    bound = min([best[0]] + open_bounds)
    return Search(micro_batch=best[1], solution=best[2], bound_s=bound, solve_seconds=took, solved=solved,
                  candidates=len(problems))


def _fewest_blocks(pb, counts: list[int], tier: tuple[str, tuple], limit_s: float) -> int | None:
    """Smallest block count with any feasible solution (None if even the finest partition does not fit).
    An undecided check counts as feasible, so nothing that might fit is skipped. `tier`: (state tier, own)."""
    def fits(u: int) -> bool:
        return ilp.solve(pb, u, tier[0], own=tier[1], time_limit_s=limit_s, feasibility=True) is not None
    if not fits(counts[-1]):
        return None
    lo, hi = 0, len(counts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(counts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return counts[lo]


def _problem(prof: ModelProfile, hw: Hardware, req: Request, mb: int, cap: int) -> ilp.Problem:
    sizes = tuple(layer_sizes(lp, mb, req.seq_len) for lp in prof.layers)
    return ilp.Problem(sizes=sizes, hw=hw, method=req.method, grad_accum=req.batch // mb,
                       cap_bytes=cap, steps_per_block=req.steps_per_block, switch_state=req.switch_state,
                       train_embeddings=req.train_embeddings and req.method == "bcd",
                       tied=prof.model.tie_embeddings)


def _assemble(prof, hw, req, budget, reserve, found: Search) -> Plan:
    mb, sol = found.micro_batch, found.solution
    n = prof.n_decoder
    if req.method == "full":
        blocks = (Block(first=0, last=n + 1),)
    else:
        starts = list(sol.starts) + [n + 2 if req.train_embeddings else n + 1]
        blocks = tuple(Block(first=a, last=b - 1) for a, b in zip(starts, starts[1:]))
    g = req.batch // mb
    shape = Shape(micro_batch=mb, seq_len=req.seq_len, grad_accum=g)
    best = sol.objective_s * g
    gap = max(0.0, (best - found.bound_s) / best) if best > 0 else 0.0
    status = "OPTIMAL" if gap < 1e-9 else "FEASIBLE"
    # objective and bound: seconds of one cycle through the blocks per token of an optimizer step
    solver = SolverReport(status=status, objective=best * req.steps_per_block / shape.tokens_per_step,
                          bound=found.bound_s * req.steps_per_block / shape.tokens_per_step, gap=gap,
                          solve_seconds=found.solve_seconds, time_limit_s=req.time_limit_s,
                          candidates=found.solved)
    draft = Plan(schema=SCHEMA_VERSION, model=prof.model, fingerprint=prof.fingerprint, hardware=hw,
                 budget_bytes=budget, reserve_bytes=reserve, shape=shape, method=req.method, blocks=blocks,
                 order=req.order, seed=req.seed, steps_per_block=req.steps_per_block,
                 switch_state=req.switch_state, placements=sol.placements, prefetch_window_bytes=sol.window_bytes,
                 predicted=Prediction(phases=tuple(PhasePrediction(block=k, peak_vram_bytes=0)
                                                   for k in range(len(blocks))),
                                      host_ram_bytes=0, nvme_bytes=0, cycle_seconds=0.0, tokens_per_s=0.0),
                 solver=solver)
    return dataclasses.replace(draft, predicted=predict(draft, prof))


def predict(plan: Plan, prof: ModelProfile, *, window: int | None = None) -> Prediction:
    """The planner's predictions for a plan: memory from the schedule's replay, time from the ILP's costs.
    `window`: as in build_schedule."""
    hw = plan.hardware
    sched = build_schedule(plan, prof, window=window)
    sizes = sched.sizes
    g = plan.shape.grad_accum
    phases = []
    for ph in sched.phases:
        peak, breakdown, _ = memory_timeline(ph)
        k = ph.block
        bl = plan.blocks[k]
        per_mb = sum(ilp.layer_cost(sizes[i], *priced_as(plan, k, i), hw, lowest=(i == bl.first))
                     for i in range(plan.n_layers))
        opt = sum(ilp.step_cost(sizes[i], plan.placement(i), hw) for i in bl.layers)
        sw = sum(ilp.switch_cost(sizes[i], plan.placement(i).master, plan.switch_state, hw) for i in bl.layers)
        phases.append(PhasePrediction(block=k, peak_vram_bytes=int(peak), breakdown=breakdown,
                                      step_seconds=g * per_mb + opt, switch_seconds=sw))
    cycle, rate = cycle_rate(phases, steps_per_block=plan.steps_per_block, tokens_per_step=plan.shape.tokens_per_step)
    per_step, per_day = wear.per_step_and_day(sched, steps_per_block=plan.steps_per_block, cycle_seconds=cycle)
    return Prediction(phases=tuple(phases), host_ram_bytes=memory.host_bytes(plan, sizes, window=sched.window_layers),
                      nvme_bytes=memory.nvme_bytes(plan, sizes), cycle_seconds=cycle, tokens_per_s=rate,
                      nvme_write_bytes_per_step=per_step, nvme_write_bytes_per_day=per_day)
