"""From a model and hardware to a Plan: profile, solve the ILP for each micro-batch size, check, predict."""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from dataclasses import dataclass

from planner import ilp, memory, wear
from planner.bounds import resource_bound
from planner.cluster import Cluster, collective_seconds, make_cluster, rank_hardware, wire_bytes
from planner.costs import layer_sizes
from planner.errors import UserError
from planner.hardware import GIB, Hardware, Link
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
    batch: int = 8                       # sequences per optimizer step, over all GPUs (the global batch)
    micro_batch: int | None = None       # fixed, or chosen by the planner among the divisors of batch / gpus
    steps_per_block: int = 50
    order: str = "ascending"
    seed: int = 0
    switch_state: str = "reset"
    objective: str = "tokens"            # tokens: most tokens per second | cycle: shortest cycle through the blocks
    work_limit: float | None = None      # CP-SAT deterministic seconds for the whole search (same plan anywhere);
                                         # default WORK_LIMIT
    time_limit_s: float = 60.0           # wall-clock safety net; the plan says when it stopped the search
    max_blocks: int | None = None
    min_blocks: int | None = None        # bcd: at least this many blocks (--blocks N sets both to N)
    max_nvme_write_bytes_per_day: float | None = None  # cap on NVMe wear (planner.wear); None: no cap
    train_embeddings: bool = False       # bcd: train the embedding and the head in blocks too (pretraining)
    gpus: int = 1                        # GPUs in all (data parallel), on `nodes` nodes (planner.cluster)
    nodes: int = 1
    interconnect: str | None = None      # inter-node link by catalog name (planner.cluster.INTERCONNECTS)
    interconnect_gbps: float | None = None   # ... or a custom one, GB/s per direction per port
    ports_per_node: int | None = None    # inter-node ports per node; default by GPU kind (make_cluster)
    shard_state: bool | None = None      # shard the active block's optimizer state over the ranks; None: choose


# CP-SAT deterministic seconds for a whole search by default (a few CPU seconds): enough to prove the 7B plan
# on a 24 GiB card optimal, and for every row of benchmarks/plan_quality.py to come within 99% of the best
# over an exhaustive scan of block counts (8B on a 40 GiB A100 needs the most)
WORK_LIMIT = 1.6

# past a quarter of its work budget, the search stops solving once the best plan is within this fraction of
# every bound left (the plan reports the gap that remains). Before, it closes the gap (7B: proven optimal with
# a tenth of the budget); 70B's neighbouring block counts differ by less than this and CP-SAT leaves gaps of
# this order on each, so closing them took all of the budget for differences the cost model cannot tell apart
GAP_TOLERANCE = 0.005
# when the work budget is spent and the best plan is still more than EXTEND_GAP above the smallest bound left,
# the search goes on, up to EXTEND times the budget: a plan provably far from the best is not worth the seconds
# saved (70B on an 80 GiB A100 with a 40 GiB budget: 591 tokens/s at 1.6 deterministic seconds, gap 11.8%, 634
# at 8; the plans within EXTEND_GAP, the 7B and 70B RTX 4090 plans among them, never spend more)
EXTEND_GAP = 0.05
EXTEND = 5.0


def work_limit(req: Request, prof: ModelProfile) -> float:
    return req.work_limit if req.work_limit is not None else WORK_LIMIT


def rank_batch(req: Request) -> int:
    """Sequences each rank runs per optimizer step: the global batch over the GPUs (make_plan checks it
    divides)."""
    return req.batch // max(1, req.gpus)


def accum(req: Request, mb: int) -> int:
    """Micro-batches each rank accumulates per optimizer step at micro-batch `mb`."""
    return rank_batch(req) // mb


def candidates(req: Request) -> list[int]:
    if req.micro_batch:
        return [req.micro_batch]
    b = rank_batch(req)
    return [m for m in (1, 2, 4, 8, 16, 32) if b % m == 0 and m <= b]


def make_plan(cfg: ModelConfig, hw: Hardware, req: Request, profile: ModelProfile | None = None) -> Plan:
    prof = profile or profile_model(cfg)
    if req.seq_len > cfg.max_seq:
        raise UserError(f"--seq {req.seq_len} is longer than the model allows ({cfg.max_seq}).")
    cluster = cluster_of(req, hw)   # validates --gpus / --nodes / the links
    if req.batch % cluster.world:
        raise UserError(f"--batch {req.batch} is the global batch (sequences per optimizer step over all GPUs) and "
                        f"does not divide evenly over --gpus {cluster.world}; give a multiple of {cluster.world}.")
    if req.micro_batch and rank_batch(req) % req.micro_batch:
        raise UserError(f"--micro-batch {req.micro_batch} does not divide --batch {req.batch}." if cluster.world == 1
                        else f"--micro-batch {req.micro_batch} does not divide the {rank_batch(req)} sequences each "
                        f"GPU runs per step (--batch {req.batch} over --gpus {cluster.world}).")
    if req.shard_state and cluster.world == 1:
        raise UserError("--shard-state on shards optimizer state over several GPUs; give --gpus 2 or more.")
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
    # (FSDP holds a shard of the weights on each GPU of the node; BCD all of them on each)
    room = cap * (cluster.gpus_per_node if req.method == "full" else 1) + memory.host_usable_bytes(hw) \
        + memory.nvme_usable_bytes(hw)
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
    blocks: int
    score_s: float        # the best plan's score (see `score`)
    bound_s: float        # global lower bound on the best score
    solve_seconds: float  # wall clock in CP-SAT (reported only)
    work: float           # CP-SAT deterministic time spent, all solves together
    wall_capped: bool     # the wall-clock safety net stopped the search
    solved: int           # subproblems solved
    candidates: int


def score(cost_s: float, blocks: int, objective: str) -> float:
    """What the search minimises, from a subproblem's cost (seconds of one cycle per step of each block:
    every block's steps, optimizer steps and switches, divided by steps_per_block).

    tokens: cost / blocks, seconds per optimizer step averaged over the cycle. A cycle trains every block
    steps_per_block steps of tokens_per_step tokens, so tokens/s = tokens_per_step / (cost / blocks):
    minimising it maximises throughput, whatever the block count. cycle: the cost itself, the time to train
    every layer once per steps_per_block steps, which favours the fewest blocks."""
    return cost_s / blocks if objective == "tokens" else cost_s


def search(prof: ModelProfile, hw: Hardware, req: Request, cap: int, *,
           gap_tolerance: float = GAP_TOLERANCE, tight_bounds: bool = True) -> Search | None:
    """Every micro-batch candidate x state tier x block count, as separate CP-SAT problems: branch and bound,
    best first.

    All of it is bounded by deterministic work (CP-SAT's deterministic time, `req.work_limit` for the whole
    search), never by the clock, so the same request gives the same plan on any machine under any load; the
    wall clock (`req.time_limit_s`) is a safety net that the Search reports when it bites.

    Every subproblem is queued under a cheap valid lower bound (ilp.lower_bound, divided by the block count
    for the tokens objective: of the form a + b/U + c*U, not monotone in U, so each count gets its own).
    The first time one is popped it goes back under bounds.resource_bound (tight_bounds), which prices the
    memory that forces dearer placements (a few milliseconds, where the cheap bound is 10-25% loose and a solve
    costs a tenth of a second); most subproblems are never solved once that bound is in the queue. Popped a
    second time, it is solved with a small amount of work; unless that proves it, it goes back under the
    solver's own bound (the LP relaxation's) with four times the work for next time. The search stops solving
    when the smallest bound left cannot beat the best plan (proven optimal), when it is within gap_tolerance of
    it and a quarter of the work budget is spent, or when all of it is spent with a plan in hand (up to EXTEND
    times it while that plan is more than EXTEND_GAP above the smallest bound left); the smallest
    bound left (tightened, as far as a few dozen resource bounds go) is then the reported bound.
    Finer partitions never need more memory, so feasibility is monotone in the block count: an infeasible
    count rules out the smaller ones of its family. For the tokens objective a family (micro-batch, state
    tier, layout) checks its finest partition once, before its first count is solved; for the cycle objective,
    which pops the fewest blocks first, a bisection for the fewest feasible blocks does that up front."""
    n = prof.n_decoder
    started = time.perf_counter()
    obj = req.objective
    budget = work_limit(req, prof)
    first = 0.01                      # deterministic seconds of a first solve, times _size
    best = None                       # (score, mb, u, solution)
    stats = {"took": 0.0, "work": 0.0, "solved": 0, "capped": False}
    counts = [1] if req.method == "full" else list(range(req.min_blocks or 1, min(n, req.max_blocks or n) + 1))
    problems = {mb: _problem(prof, hw, req, mb, cap) for mb in candidates(req)}
    infeasible_upto = {}              # (mb, (tier, own)) -> every block count up to this one is infeasible

    def wall_left() -> float:
        return req.time_limit_s - (time.perf_counter() - started)

    def run(mb, u, tier, work, **kw):
        """One CP-SAT solve, counted; keep it if it is the best plan so far."""
        nonlocal best
        sol = ilp.solve(problems[mb], u, tier[0], own=tier[1], work_limit=work,
                        time_limit_s=max(0.02, wall_left()), **kw)
        stats["solved"] += 1
        if sol is None:
            infeasible_upto[(mb, tier)] = max(u, infeasible_upto.get((mb, tier), 0))
            return None
        stats["took"] += sol.solve_seconds
        stats["work"] += sol.work
        stats["capped"] |= sol.wall_capped
        if not kw and sol.status != "UNKNOWN":
            sc = score(sol.objective_s * accum(req, mb), u + sum(tier[1]), obj)
            if best is None or sc < best[0]:
                best = (sc, mb, u + sum(tier[1]), sol)
        return sol

    cheap = {}                        # ilp.lower_bound by (mb, blocks, state tier): each is asked for twice or more

    def cheap_bound(mb, u, state) -> float:
        if (mb, u, state) not in cheap:
            cheap[(mb, u, state)] = ilp.lower_bound(problems[mb], u, state)
        return cheap[(mb, u, state)]

    def bound(mb, u, tier) -> float:
        return score(cheap_bound(mb, u, tier[0]) * accum(req, mb), u + sum(tier[1]), obj)

    tightened = set()                 # subproblems queued under bounds.resource_bound, not the cheap bound
    prices = {}                       # resource_bound's prices, from one block count to the next

    def fits(mb, k, tier) -> bool:
        """Any feasible plan with k blocks? (An undecided check counts as feasible.)"""
        return run(mb, k, tier, 2 * first * _size(problems[mb], k), feasibility=True) is not None

    def tighten(lb, mb, tier, u, work) -> bool:
        """Queue a subproblem again under the tighter bound, if it is the first time and it is tighter."""
        tightened.add((mb, tier, u))
        if not tight_bounds:
            return False
        g, blocks = accum(req, mb), u + sum(tier[1])
        # enough to rule it out: what the best plan scores, as this subproblem's cost
        enough = math.inf if best is None else best[0] * (blocks if obj == "tokens" else 1) / g
        tight = score(resource_bound(problems[mb], u, tier[0], enough=enough, cheap=cheap_bound(mb, u, tier[0]),
                                     prices=prices) * g, blocks, obj)
        if tight > lb:
            heapq.heappush(frontier, (tight, mb, tier, u, work))
            return True
        return False

    frontier = []                     # (bound, mb, tier, u, work for its next solve); u == 0: a family not expanded
    for mb in problems:
        # the state tier, and where a trained embedding and head go (ilp.layouts): separate families
        for tier in [(t, own) for t in ilp.state_choices(problems[mb]) for own in ilp.layouts(problems[mb])]:
            frontier.append((min(bound(mb, u, tier) for u in counts), mb, tier, 0, 0.0))
    heapq.heapify(frontier)
    left = None                       # the smallest bound not closed when the search stops
    spare = 64                        # bounds still to tighten once done (for a tighter reported gap)
    unchecked = set()                 # families whose finest partition has not been checked yet
    dropped = []                      # bounds of subproblems the safety net left unfinished
    while frontier:
        lb, mb, tier, u, work = heapq.heappop(frontier)
        if u and u <= infeasible_upto.get((mb, tier), 0):
            continue
        if best is not None and lb >= best[0] * (1 - 1e-9):
            break  # every subproblem left is bounded at least as high
        if wall_left() <= 0:
            stats["capped"] = True
        # done: no more solves (out of work, or the best plan is within gap_tolerance of every bound left);
        # the smallest bound left is the reported one, and tightening it costs no solve
        limit = budget if best is None or lb >= best[0] * (1 - EXTEND_GAP) else EXTEND * budget
        done = best is not None and (stats["capped"] or stats["work"] >= limit
                                     or (lb >= best[0] * (1 - gap_tolerance) and stats["work"] >= budget / 4))
        if done and (stats["capped"] or spare <= 0):
            left = lb
            break
        if u == 0 and (done or (obj == "tokens" and len(counts) > 1)):
            # a family's counts, under their cheap bounds; whether its finest partition fits at all is checked
            # before the first of them is solved (most families never get there once the bounds are tight)
            for k in counts:
                heapq.heappush(frontier, (bound(mb, k, tier), mb, tier, k, first * _size(problems[mb], k)))
            unchecked.add((mb, tier))
            continue
        if u and (mb, tier, u) not in tightened:
            spare -= done
            if tighten(lb, mb, tier, u, work):
                continue
        if done:
            left = lb
            break
        if u == 0:  # cycle: bisect a family for its fewest feasible blocks (which also checks its finest)
            fewest = _fewest_blocks(lambda k, mb=mb, tier=tier: fits(mb, k, tier), counts)
            for k in counts[counts.index(fewest):] if fewest is not None else []:
                heapq.heappush(frontier, (bound(mb, k, tier), mb, tier, k, first * _size(problems[mb], k)))
            continue
        if (mb, tier) in unchecked:
            unchecked.discard((mb, tier))
            if not fits(mb, counts[-1], tier):
                continue   # nothing of this family fits (run() marked every count infeasible)
        if best is not None:  # the last solves share out what is left of the budget
            work = min(work, max(first, limit - stats["work"]))
        sol = run(mb, u, tier, work)
        if sol is not None and sol.status != "OPTIMAL":
            again = (max(lb, score(sol.bound_s * accum(req, mb), u + sum(tier[1]), obj)), mb, tier, u,
                     4 * work)
            if stats["capped"] and best is None:
                dropped.append(again[0])   # no more time for it; its bound still counts
            else:
                heapq.heappush(frontier, again)
    if best is None and stats["capped"]:
        raise UserError(f"the wall-clock safety net (--time-limit {req.time_limit_s:g} s) stopped the search "
                        "before it found any plan; give it more time.")
    if best is None:
        return None
    return Search(micro_batch=best[1], solution=best[3], blocks=best[2], score_s=best[0],
                  bound_s=min([best[0]] + dropped + ([] if left is None else [left])), solve_seconds=stats["took"],
                  work=stats["work"], wall_capped=stats["capped"], solved=stats["solved"], candidates=len(problems))


def _size(pb: ilp.Problem, blocks: int) -> float:
    """A subproblem's size in hundreds of count variables, to the power 1.5: its first solve's work. (A first
    solve too short to find a solution is wasted: 70B subproblems of 40 to 60 blocks need about ten times the
    work of 7B ones of 16 to 20.)"""
    return max(1.0, blocks * len(ilp.combos("decoder", memory.tiers(pb.hw))) / 100) ** 1.5


def _fewest_blocks(fits, counts: list[int]) -> int | None:
    """Smallest block count with any feasible solution (None if even the finest partition does not fit).
    An undecided check counts as feasible, so nothing that might fit is skipped."""
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
    """The ILP's subproblem at micro-batch `mb`: one rank's view of the cluster (its share of the node's host
    bandwidths and CPU optimizer, planner.cluster.rank_hardware), its micro-batches per step."""
    sizes = tuple(layer_sizes(lp, mb, req.seq_len) for lp in prof.layers)
    cl = cluster_of(req, hw)
    return ilp.Problem(sizes=sizes, hw=rank_hardware(hw, cl), method=req.method, grad_accum=accum(req, mb),
                       cap_bytes=cap, steps_per_block=req.steps_per_block, switch_state=req.switch_state,
                       train_embeddings=req.train_embeddings and req.method == "bcd",
                       tied=prof.model.tie_embeddings, cluster=cl, shard=req.shard_state)


def _assemble(prof, hw, req, budget, reserve, found: Search) -> Plan:
    mb, sol = found.micro_batch, found.solution
    n = prof.n_decoder
    if req.method == "full":
        blocks = (Block(first=0, last=n + 1),)
    else:
        starts = list(sol.starts) + [n + 2 if req.train_embeddings else n + 1]
        blocks = tuple(Block(first=a, last=b - 1) for a, b in zip(starts, starts[1:]))
    tokens_per_step = req.seq_len * req.batch   # the global batch
    best = found.score_s
    gap = max(0.0, (best - found.bound_s) / best) if best > 0 else 0.0
    status = "OPTIMAL" if gap < 1e-9 else "FEASIBLE"
    # tokens: seconds per token (1 / tokens per second); cycle: seconds of one cycle through the blocks per
    # token of an optimizer step
    per = (1 if req.objective == "tokens" else req.steps_per_block) / tokens_per_step
    solver = SolverReport(status=status, objective_kind=req.objective, objective=best * per,
                          bound=found.bound_s * per, gap=gap, solve_seconds=found.solve_seconds,
                          time_limit_s=req.time_limit_s, work=found.work, work_limit=work_limit(req, prof),
                          wall_capped=found.wall_capped, candidates=found.solved)
    return build_plan(prof, hw, req, budget, reserve, micro_batch=mb, blocks=blocks, placements=sol.placements,
                      window_bytes=sol.window_bytes, solver=solver, shard_state=sol.shard)


def cluster_of(req: Request, hw: Hardware) -> Cluster:
    """The request's cluster; a calibrated hardware profile's measured collective bandwidth (host
    .collective_gbps, `blockfit calibrate` under torchrun) replaces the catalog's intra-node link figure."""
    cl = make_cluster(hw.gpu, gpus=req.gpus, nodes=req.nodes, interconnect_name=req.interconnect,
                      interconnect_gbps=req.interconnect_gbps, ports_per_node=req.ports_per_node)
    if cl.intra is not None and hw.host.collective_gbps > 0:
        cl = dataclasses.replace(cl, intra=Link(name="calibrated", gbps=hw.host.collective_gbps,
                                                latency_s=cl.intra.latency_s))
    return cl


def build_plan(prof: ModelProfile, hw: Hardware, req: Request, budget: int, reserve: int, *, micro_batch: int,
               blocks: tuple[Block, ...], placements, window_bytes: int, solver: SolverReport,
               predicted: Prediction | None = None, shard_state: bool | None = None) -> Plan:
    """The Plan for a chosen micro-batch, blocks and placements (the ILP's or the fast planner's): the request's
    other choices copied in, and `predicted` or, when None, the planner's prediction (`predict`). `shard_state`:
    the solver's choice (default the request's); full-parameter training on 2+ GPUs is FSDP, always sharded."""
    cl = cluster_of(req, hw)
    shape = Shape(micro_batch=micro_batch, seq_len=req.seq_len, grad_accum=accum(req, micro_batch), gpus=cl.world)
    shard = bool(req.shard_state if shard_state is None else shard_state) or req.method == "full"
    draft = Plan(schema=SCHEMA_VERSION, model=prof.model, fingerprint=prof.fingerprint, hardware=hw,
                 budget_bytes=budget, reserve_bytes=reserve, shape=shape, method=req.method, blocks=blocks,
                 order=req.order, seed=req.seed, steps_per_block=req.steps_per_block,
                 switch_state=req.switch_state, placements=tuple(placements), prefetch_window_bytes=window_bytes,
                 predicted=predicted or Prediction(phases=tuple(PhasePrediction(block=k, peak_vram_bytes=0)
                                                                for k in range(len(blocks))),
                                                   host_ram_bytes=0, nvme_bytes=0, cycle_seconds=0.0,
                                                   tokens_per_s=0.0),
                 solver=solver, cluster=cl, shard_state=shard and cl.world > 1)
    return draft if predicted is not None else dataclasses.replace(draft, predicted=predict(draft, prof))


def predict(plan: Plan, prof: ModelProfile, *, window: int | None = None) -> Prediction:
    """The planner's predictions for a plan: memory from the schedule's replay (per GPU; host RAM and NVMe per
    node), time from the ILP's costs on one rank's share of its node (planner.cluster.rank_hardware), the
    gradient reductions' exposed part (ilp.exposed_reduce_seconds) included; bytes each rank sends per step
    counted from the schedule's net ops. `window`: as in build_schedule."""
    cl = plan.cluster
    hw = rank_hardware(plan.hardware, cl)
    fs = plan.world if memory.fsdp(plan) else 1
    shards = memory.state_shards(plan)
    sched = build_schedule(plan, prof, window=window)
    sizes = sched.sizes
    g = plan.shape.grad_accum
    tiers = memory.tiers(plan.hardware)
    phases = []
    for ph in sched.phases:
        peak, breakdown, _ = memory_timeline(ph)
        k = ph.block
        bl = plan.blocks[k]
        per_mb = sum(ilp.layer_cost(sizes[i], *priced_as(plan, k, i), hw, lowest=(i == bl.first), cluster=cl,
                                    fsdp=fs)
                     for i in range(plan.n_layers))
        opt = sum(ilp.step_cost(sizes[i], plan.placement(i), hw, shards=shards, cluster=cl, gather=fs == 1)
                  for i in bl.layers)
        sw = sum(ilp.switch_cost(sizes[i], plan.placement(i).master, plan.switch_state, hw, shards=shards)
                 for i in bl.layers)
        net = _exposed_reduce(plan, sizes, bl, hw, tiers) if plan.world > 1 and fs == 1 else 0.0
        ops = [op for op in ph.ops if op.stream == "net"]
        phases.append(PhasePrediction(block=k, peak_vram_bytes=int(peak), breakdown=breakdown,
                                      step_seconds=g * per_mb + opt + net, switch_seconds=sw,
                                      wire_bytes_per_step=sum(wire_bytes(op.collective, op.bytes, plan.world)
                                                              for op in ops),
                                      net_seconds=sum(collective_seconds(op.collective, op.bytes, cl) for op in ops)))
    cycle, rate = cycle_rate(phases, steps_per_block=plan.steps_per_block, tokens_per_step=plan.shape.tokens_per_step)
    per_step, per_day = wear.per_step_and_day(sched, steps_per_block=plan.steps_per_block, cycle_seconds=cycle)
    return Prediction(phases=tuple(phases), host_ram_bytes=memory.host_bytes(plan, sizes, window=sched.window_layers),
                      nvme_bytes=memory.nvme_bytes(plan, sizes), cycle_seconds=cycle, tokens_per_s=rate,
                      nvme_write_bytes_per_step=per_step, nvme_write_bytes_per_day=per_day,
                      wire_bytes_per_step=sum(p.wire_bytes_per_step for p in phases) // len(phases))


def _exposed_reduce(plan: Plan, sizes, bl, hw: Hardware, tiers) -> float:
    """Seconds a phase's gradient reductions add to its step, the ILP's rule (ilp.exposed_reduce_seconds and
    bottom_reduce_seconds): each trained layer's reduction beyond its own backward, and the lowest layer's
    beyond nothing, up to its kind's cheapest backward."""
    cl, shard = plan.cluster, plan.shard_state
    out = 0.0
    for i in bl.layers:
        pl = plan.placement(i)
        r = ilp.reduce_seconds(sizes[i], shard, cl)
        out += ilp.exposed_reduce_seconds(r, ilp.pass_costs(sizes[i], pl, "active", hw, cluster=cl)[1])
    low = sizes[bl.first]
    tier = plan.placement(bl.first).master
    b_min = min(ilp.pass_costs(low, ilp._placement(low.index, c, tier), "active", hw, cluster=cl)[1]
                for c in ilp.combos(low.kind, tiers))
    return out + ilp.bottom_reduce_seconds(ilp.reduce_seconds(low, shard, cl), b_min)
