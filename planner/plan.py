"""The plan: what the ILP decided, as a versioned, frozen, JSON-serialisable contract.

A plan names the model (with a fingerprint of its shape), the hardware, the VRAM budget, the training shape,
the method (bcd or full), the blocks and their order, and for every layer where each tensor class lives:
bf16 weights, fp32 master weights, AdamW moments, gradients, saved activations. It carries the planner's
predictions and the solver's report. `load_plan` validates a file at the edge with clear errors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from dataclasses import dataclass, field

from planner.cluster import SINGLE, Cluster
from planner.errors import UserError, read_json
from planner.hardware import Hardware, check_hardware
from planner.memory import ACT_PLACES, GRAD_TIERS, STATE_TIERS, WEIGHT_TIERS
from planner.models import ModelConfig

SCHEMA_VERSION = 1
ORDERS = ("ascending", "descending", "random")
SWITCH_POLICIES = ("reset", "keep_cpu", "keep_nvme")
METHODS = ("bcd", "full")
OBJECTIVES = ("tokens", "cycle")


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one layer's tensors live. master/moments/grads matter only while the layer is trained."""
    layer: int
    weights: str = "gpu"       # bf16 weights: gpu | cpu (pinned) | nvme
    master: str = "gpu"        # fp32 master copy: gpu | cpu | nvme
    moments: str = "gpu"       # AdamW m and v (fp32): gpu | cpu | nvme
    grads: str = "gpu"         # bf16 gradients: gpu | cpu (streamed off as backward makes them)
    activations: str = "gpu"   # saved for backward: gpu | cpu (offloaded) | recompute


@dataclass(frozen=True, kw_only=True)
class Shape:
    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    gpus: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.grad_accum * self.gpus


@dataclass(frozen=True, kw_only=True)
class Block:
    first: int   # layer indices, inclusive (0 = embedding, n + 1 = head)
    last: int

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(frozen=True, kw_only=True)
class PhasePrediction:
    block: int
    peak_vram_bytes: int
    breakdown: dict = field(default_factory=dict)   # bytes by class: weights, prefetch, master, moments, ...
    step_seconds: float = 0.0
    switch_seconds: float = 0.0
    wire_bytes_per_step: int = 0  # bytes each rank sends per optimizer step (its collectives, planner.cluster)
    net_seconds: float = 0.0      # seconds the network is busy per step (the part of it that backward does not
                                  # hide is in step_seconds)


@dataclass(frozen=True, kw_only=True)
class Prediction:
    phases: tuple[PhasePrediction, ...]
    host_ram_bytes: int           # per node: its ranks' buffers, and the frozen weights they share once
    nvme_bytes: int               # per node
    cycle_seconds: float          # every block trained steps_per_block steps, switches included
    tokens_per_s: float           # tokens processed per second, averaged over a cycle
    nvme_write_bytes_per_step: int = 0     # written to NVMe per optimizer step, a mean over the cycle (planner.wear)
    nvme_write_bytes_per_day: float = 0.0  # ... per day at the predicted rate
    wire_bytes_per_step: int = 0  # bytes each rank sends per optimizer step, a mean over the cycle's phases

    @property
    def peak_vram_bytes(self) -> int:
        return max(p.peak_vram_bytes for p in self.phases)


def cycle_rate(phases, *, steps_per_block: int, tokens_per_step: int) -> tuple[float, float]:
    """(cycle seconds, tokens/s over it) of phases with step_seconds and switch_seconds: every block trained
    steps_per_block steps, its switch included. The planner, the simulator and the fast planner all use it."""
    cycle = sum(steps_per_block * p.step_seconds + p.switch_seconds for p in phases)
    tokens = tokens_per_step * steps_per_block * len(phases)
    return cycle, tokens / cycle if cycle > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class SolverReport:
    status: str                   # OPTIMAL | FEASIBLE | HEURISTIC
    objective: float              # tokens: seconds per token (1 / tokens per second), what was minimised;
                                  # cycle: seconds of one cycle through the blocks per token of a step
    bound: float                  # a proven lower bound on `objective`, in its units
    gap: float                    # (objective - bound) / objective
    solve_seconds: float          # wall clock in the solver: the one field that varies between runs
    time_limit_s: float           # the wall-clock safety net
    candidates: int = 1           # subproblems solved
    objective_kind: str = "cycle" # tokens | cycle (plans written before the tokens objective: cycle)
    work: float = 0.0             # the solver's deterministic time spent (machine- and load-independent)
    work_limit: float = 0.0       # the deterministic budget of the search
    wall_capped: bool = False     # the safety net stopped the search: the plan may differ on another machine


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema: int
    model: ModelConfig
    fingerprint: str
    hardware: Hardware
    budget_bytes: int             # the VRAM budget the user gave
    reserve_bytes: int            # kept free for CUDA context and allocator slack
    shape: Shape
    method: str                   # bcd | full
    blocks: tuple[Block, ...]
    order: str                    # ascending | descending | random
    seed: int
    steps_per_block: int
    switch_state: str             # reset | keep_cpu | keep_nvme
    placements: tuple[Placement, ...]
    prefetch_window_bytes: int
    predicted: Prediction
    solver: SolverReport
    cluster: Cluster = SINGLE     # the GPUs and links; shape.gpus is its world size
    shard_state: bool = False     # the active block's fp32 master and moments sharded over the ranks (ZeRO-1
                                  # style: reduce-scatter gradients, step a shard, all-gather bf16 weights)

    @property
    def world(self) -> int:
        return self.cluster.world

    @property
    def n_layers(self) -> int:
        return self.model.layers + 2

    def placement(self, layer: int) -> Placement:
        return self.placements[layer]

    def block_order(self, cycle: int) -> list[int]:
        """Indices of the blocks in the order cycle number `cycle` trains them."""
        idx = list(range(len(self.blocks)))
        if self.order == "descending":
            return idx[::-1]
        if self.order == "random":
            random.Random(self.seed * 1_000_003 + cycle).shuffle(idx)
        return idx

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        pred = d["predicted"]
        return cls(
            schema=d["schema"], model=ModelConfig.from_dict(d["model"]), fingerprint=d["fingerprint"],
            hardware=Hardware.from_dict(d["hardware"]), budget_bytes=d["budget_bytes"],
            reserve_bytes=d["reserve_bytes"], shape=Shape(**d["shape"]), method=d["method"],
            blocks=tuple(Block(**b) for b in d["blocks"]), order=d["order"], seed=d["seed"],
            steps_per_block=d["steps_per_block"], switch_state=d["switch_state"],
            placements=tuple(Placement(**p) for p in d["placements"]),
            prefetch_window_bytes=d["prefetch_window_bytes"],
            predicted=Prediction(phases=tuple(PhasePrediction(**p) for p in pred["phases"]),
                                 **{k: v for k, v in pred.items() if k != "phases"}),
            solver=SolverReport(**d["solver"]), cluster=Cluster.from_dict(d.get("cluster")),
            shard_state=d.get("shard_state", False))


def validate(plan: Plan) -> None:
    """Ranges and consistency; raises UserError naming the first field that is wrong."""
    def bad(what: str):
        raise UserError(f"invalid plan: {what}.")
    n = plan.n_layers
    if plan.method not in METHODS:
        bad(f"method '{plan.method}' is not one of {', '.join(METHODS)}")
    if plan.order not in ORDERS:
        bad(f"block order '{plan.order}' is not one of {', '.join(ORDERS)}")
    if plan.switch_state not in SWITCH_POLICIES:
        bad(f"switch_state '{plan.switch_state}' is not one of {', '.join(SWITCH_POLICIES)}")
    s = plan.shape
    for name in ("micro_batch", "seq_len", "grad_accum", "gpus"):
        if not _posint(getattr(s, name)):
            bad(f"shape.{name} must be a positive integer")
    c = plan.cluster
    if not (_posint(c.nodes) and _posint(c.gpus_per_node) and _posint(c.ports_per_node)):
        bad("cluster.nodes, cluster.gpus_per_node and cluster.ports_per_node must be positive integers")
    if s.gpus != c.world:
        bad(f"shape.gpus is {s.gpus} but the cluster has {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = "
            f"{c.world}; make the plan again with `plan --gpus N --nodes M`")
    if (c.gpus_per_node > 1) != (c.intra is not None) or (c.nodes > 1) != (c.inter is not None):
        bad("cluster links do not match its shape (an intra-node link with 2+ GPUs a node, an inter-node link "
            "with 2+ nodes)")
    for link in (c.intra, c.inter):
        if link is not None and not (isinstance(link.gbps, (int, float)) and 0 < link.gbps < float("inf")):
            bad(f"cluster link '{link.name}' needs a positive finite gbps")
    if not isinstance(plan.shard_state, bool) or (plan.shard_state and c.world == 1):
        bad("shard_state must be true or false, and false on one GPU")
    if s.seq_len > plan.model.max_seq:
        bad(f"shape.seq_len {s.seq_len} is above the model's max_seq {plan.model.max_seq}")
    if not _posint(plan.steps_per_block):
        bad("steps_per_block must be a positive integer")
    if not (_posint(plan.budget_bytes) and _posint(plan.reserve_bytes + 1) and plan.reserve_bytes < plan.budget_bytes):
        bad("budget_bytes must be a positive integer and reserve_bytes a smaller non-negative one")
    if not _posint(plan.seed + 1) or not _posint(plan.prefetch_window_bytes + 1) or plan.seed >= 1 << 63:
        bad("seed and prefetch_window_bytes must be non-negative integers")
    if len(plan.placements) != n or [p.layer for p in plan.placements] != list(range(n)):
        bad(f"placements must list layers 0..{n - 1} in order")
    for p in plan.placements:
        for cls_, tiers in (("weights", WEIGHT_TIERS), ("master", STATE_TIERS), ("moments", STATE_TIERS),
                            ("grads", GRAD_TIERS), ("activations", ACT_PLACES)):
            if getattr(p, cls_) not in tiers:
                bad(f"layer {p.layer} {cls_} tier '{getattr(p, cls_)}' is not one of {', '.join(tiers)}")
    if not plan.blocks:
        bad("no blocks")
    prev = None
    for b in plan.blocks:
        ints = _posint(b.first + 1) and _posint(b.last + 1)
        if not ints or not 0 <= b.first <= b.last < n or (prev is not None and b.first != prev + 1):
            bad("blocks must be contiguous, ordered, non-overlapping layer ranges")
        prev = b.last
    if plan.prefetch_window_bytes < 0:
        bad("prefetch_window_bytes must be >= 0")
    if len(plan.predicted.phases) != len(plan.blocks):
        bad("one predicted phase per block is required")
    pr = plan.predicted
    if not all(_posint(x + 1) for x in [pr.host_ram_bytes, pr.nvme_bytes, pr.nvme_write_bytes_per_step,
                                        pr.wire_bytes_per_step]
               + [p.peak_vram_bytes for p in pr.phases] + [p.wire_bytes_per_step for p in pr.phases]):
        bad("predicted byte counts must be non-negative integers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf")
               for x in [pr.cycle_seconds, pr.tokens_per_s, pr.nvme_write_bytes_per_day]
               + [p.step_seconds for p in pr.phases]
               + [p.switch_seconds for p in pr.phases] + [p.net_seconds for p in pr.phases]):
        bad("predicted times and rates must be finite non-negative numbers")


def _posint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_fingerprint(plan: Plan, cfg: ModelConfig) -> None:
    if plan.fingerprint != cfg.fingerprint():
        raise UserError(f"the plan was made for another model (fingerprint {plan.fingerprint}, this model's is "
                        f"{cfg.fingerprint()}); make a new plan with `plan --model ... --out plan.json`.")


def load_plan(path: str) -> Plan:
    raw = read_json(path, "plan file", f"; write one with `plan ... --out {path}`")
    if not isinstance(raw, dict) or "schema" not in raw:
        raise UserError(f"plan file '{path}' is not a Blockfit plan (no 'schema' field).")
    if raw["schema"] != SCHEMA_VERSION:
        raise UserError(f"plan file '{path}' has schema version {raw['schema']}; this Blockfit reads version "
                        f"{SCHEMA_VERSION}. Make the plan again with this version.")
    try:
        plan = Plan.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"plan file '{path}' is damaged or incomplete ({type(e).__name__}: {e}).") from None
    except UserError as e:  # the model's own validator
        raise UserError(f"plan file '{path}': {e}") from None
    check_hardware(plan.hardware, f"plan file '{path}': hardware")
    try:
        validate(plan)
    except UserError as e:
        raise UserError(f"plan file '{path}': {e}") from None
    except (TypeError, ValueError) as e:  # a number of the wrong type somewhere
        raise UserError(f"plan file '{path}' holds a value of the wrong type ({e}).") from None
    if plan.fingerprint != plan.model.fingerprint():
        raise UserError(f"plan file '{path}': its fingerprint does not match its own model config; "
                        "the file was edited or damaged.")
    return plan


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, rename: never a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"cannot write '{path}': directory '{d}' does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror}.") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise UserError(f"cannot write '{path}': {e.strerror}.") from None
