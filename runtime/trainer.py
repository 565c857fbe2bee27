"""The training loop: a plan's schedule, executed step after step, block after block.

One optimizer step of a phase (the training of one block) is the schedule's op list for that block: for every
micro-batch, each layer's forward on a detached input (layers below the block under no_grad, saving nothing),
then each layer's backward from the head down to the block's first layer, torch.autograd.backward(out, grad_out),
handing the input's gradient to the layer below; then the block's AdamW step on the tier its state lives on.
Frozen parameters have requires_grad=False and never a .grad; only the active block has optimizer state.

Within a phase, the next step's first NVMe reads (frozen layers: nothing this step does changes them) are issued
as soon as this step's last read is, so the drive never waits for a step boundary.

Blocks are visited in the plan's order (ascending, descending, or a seeded random order per cycle),
steps_per_block steps each; the switch policy decides what happens to the optimizer state at a switch. The
learning rate warms up linearly and decays along a cosine to min_lr over the run's steps. Checkpoints hold the
weights (Hugging Face names), the optimizer state, the data position, the RNG states and the position in the block
schedule, so a resumed run continues exactly; SIGINT and SIGTERM end the current step, save and stop.

Data parallel (a plan for N GPUs, run by N ranks: runtime.dist): every rank runs the same schedule on its slice of
the global batch (runtime.data.next_step), the schedule's net ops reduce the active block's gradients
(runtime.reducer), and every rank steps the block (or, with sharded state, its shard, then all-gathers). The
weights stay identical on every rank; each rank reports the global loss.
"""
from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass, field

import torch

from planner import memory
from planner.errors import UserError
from planner.memory import Tier
from planner.plan import Plan
from planner.profile import profile_model
from planner.schedule import build_schedule
from runtime import model as rmodel
from runtime.activations import HostBuffers
from runtime.checkpoint import Checkpoint, capture_rng, restore_rng, save_checkpoint, write_hf_config
from runtime.data import TokenData
from runtime.device import hold_budget
from runtime.dist import SINGLE, World, check_plan_world, failed_ranks, max_over_ranks
from runtime.engine import Executor, PhaseOps, Streams
from runtime.guards import check_same_plan, host_need_bytes, resume_signature
from runtime.optim import AdamWConfig, BlockOptimizer
from runtime.reducer import Reducer
from runtime.store import Target, TieredStore
from runtime.trace import Tracer, write_json


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int                          # optimizer steps of the whole run; the LR schedule spans them
    lr: float = 3e-4                    # peak learning rate
    min_lr: float = 3e-5                # end of the cosine decay
    warmup: int = 0                     # steps of linear warmup
    adamw: AdamWConfig = field(default_factory=AdamWConfig)
    seed: int = 0                       # weight init
    ckpt_dir: str | None = None
    ckpt_every: int = 0                 # steps between checkpoints (0: only at the end and on a signal)
    stop_after: int | None = None       # end this invocation (with a checkpoint) after this many steps
    nvme_dir: str | None = None
    init_from: str | None = None        # a local safetensors checkpoint (HF names) instead of random init
    metrics_path: str | None = None     # JSON lines, one per step
    trace_path: str | None = None       # Chrome trace JSON
    summary_path: str | None = None
    skip_nonfinite: int = 0             # skip up to this many consecutive non-finite steps (0: stop at the first)
    quiet: bool = False
    force_cpu: bool = False             # run on the CPU even when CUDA is there (tests)
    track_temporaries: bool = True      # CPU stand-in: measure kernel temporaries into the device ledger


NONFINITE_EXIT = 3   # the command line's exit code when training stopped on a NaN/inf loss or gradient norm


class NonFiniteStop(UserError):
    """Training met a non-finite loss or gradient norm (or weights) and stopped; nothing bad was saved."""
    exit_code = NONFINITE_EXIT


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then a cosine from cfg.lr down to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def position(plan: Plan, step: int) -> dict:
    """Where global step `step` falls in the block schedule: cycle, index in the cycle's order, block, step in it."""
    per_cycle = plan.steps_per_block * len(plan.blocks)
    cycle, in_cycle = divmod(step, per_cycle)
    index, in_block = divmod(in_cycle, plan.steps_per_block)
    return {"cycle": cycle, "index": index, "block": plan.block_order(cycle)[index], "step_in_block": in_block}


class Trainer:
    def __init__(self, plan: Plan, data: TokenData, cfg: TrainConfig, *, resume: Checkpoint | None = None,
                 target: Target | None = None, world: World = SINGLE):
        check_plan_world(plan, world)   # a plan for N GPUs trains on exactly N ranks
        self.plan, self.data, self.cfg, self.world = plan, data, cfg, world
        self.target = target or Target.detect(force_cpu=cfg.force_cpu)
        if self.target.cuda:  # before anything is allocated there: refuse a card without room, cap at the budget
            hold_budget(plan, self.target.device.index or 0)
        self.model_cfg = plan.model
        self.schedule = build_schedule(plan, profile_model(plan.model))
        self.layers = rmodel.meta_layers(plan.model)
        self.layouts = rmodel.layouts_of(self.layers, self.target.align_numel)
        self.store = TieredStore(target=self.target, layouts=self.layouts, tiers=[p.weights for p in plan.placements],
                                 nvme_dir=cfg.nvme_dir, window_layers=self.schedule.window_layers, world=self.world)
        self.optim = BlockOptimizer(cfg=cfg.adamw, store=self.store, layouts=self.layouts,
                                    master_tiers=[p.master for p in plan.placements],
                                    grad_tiers=[p.grads for p in plan.placements], switch_state=plan.switch_state,
                                    world=world, shard=plan.shard_state)
        self.reducer = None
        if world.distributed:
            self.reducer = Reducer(world=world, layouts=self.layouts, device=self.target.device,
                                   grad_dtype=self.target.weight_dtype, shard=self.optim.shard)
            if self.optim.shard:
                self.optim.norm_reduce = self.reducer.global_norm
        self.streams = Streams(self.target)
        self.tracer = Tracer(enabled=bool(cfg.trace_path or cfg.summary_path))
        self.executor = Executor(self.streams, self.tracer)
        self.act_buffers = HostBuffers(self.store.host)
        self.step_index = 0
        self.active: int | None = None          # the block whose optimizer state exists
        self.ops: PhaseOps | None = None
        self.phase_peaks: dict[int, int] = {}
        self.history: list[dict] = []
        self._stop_signal: int | None = None
        self.skipped = 0                        # non-finite steps skipped (no update), this invocation
        self._bad_run = 0                       # consecutive ones
        self._carried: dict = {}                # the next step's reads, already issued
        self.run_end = cfg.steps                # the last step of this invocation (run() sets it)
        try:
            if resume is not None:   # a checkpoint's weights win over --init-from
                self._restore(resume)
            elif cfg.init_from:
                rmodel.init_from_hf(plan.model, self.layouts, self.store, cfg.init_from)
            else:
                rmodel.init_random(plan.model, self.layouts, self.store, seed=cfg.seed)
            self.store.placed()   # a node's ranks share one host copy: local rank 0 wrote it, the others wait
            rmodel.materialise(self.layers, self.layouts, self.store)
            head = plan.n_layers - 1
            trains_matrix = any(i in (0, head) for b in plan.blocks for i in b.layers)
            self.tied = (rmodel.TiedMatrix(self.layers, self.layouts, self.store)
                         if plan.model.tie_embeddings and trains_matrix else None)
            if self.tied and self.reducer is not None:
                self.reducer.skip.add(id(self.tied.copy))
            if self.tied and self.optim.shard:
                raise UserError("this plan shards the optimizer state over the ranks and trains a tied embedding "
                                "matrix; sharded state does not step a tied matrix yet: make the plan without "
                                "sharded state, or keep the embedding and the head frozen.")
            self.store.meter.book("weights", alloc=self.store.resident_bytes())
            if resume is not None and self.active is not None:
                self._enter(self.active, switch=False)
        except BaseException:
            self.close()  # weights that do not fit, a damaged checkpoint: leave no NVMe scratch behind
            raise

    # -- phases -------------------------------------------------------------------------------------------------

    def _static(self, layers) -> dict[str, int]:
        """The phase's device bytes besides the weights (planner.memory's rule, at the runtime's sizes)."""
        numel = [lay.numel for lay in self.layouts]
        return memory.state_device_bytes(self.plan.placements, layers, numel,
                                         [n * self.target.weight_dtype.itemsize for n in numel],
                                         shards=memory.state_shards(self.plan))

    def _enter(self, block: int, *, switch: bool) -> None:
        phase = self.schedule.phases[block]
        layers = self.plan.blocks[block].layers
        for i in layers:
            for p in self.layers[i].parameters():
                p.requires_grad_(True)
        if self.tied:
            self.tied.enter(layers)
        self.ops = PhaseOps(plan=self.plan, phase=phase, layers=self.layers, layouts=self.layouts, store=self.store,
                            optim=self.optim, act_buffers=self.act_buffers, streams=self.streams,
                            track_temporaries=self.cfg.track_temporaries, reducer=self.reducer)
        if self.reducer is not None:
            self.reducer.begin_phase([i for i in layers if self.optim.grad_tiers[i] != Tier.CPU])
        self.optim.begin_phase(layers, switched=switch and bool(phase.switch_ops))
        if switch:
            self.executor.run([op for op in phase.switch_ops if op.kind == "load_state"], self.ops)
        for cls, n in self._static(layers).items():
            self.store.meter.book(cls, alloc=n)
        self.store.meter.reset_peak()
        self.active = block

    def _leave(self) -> None:
        block = self.active
        phase = self.schedule.phases[block]
        layers = self.plan.blocks[block].layers
        self.executor.run([op for op in phase.switch_ops if op.kind == "save_state"], self.ops)
        self.optim.end_phase(layers, switched=bool(phase.switch_ops))
        if self.reducer is not None:
            self.reducer.end_phase()
        self.ops.close()
        for cls, n in self._static(layers).items():
            self.store.meter.book(cls, free=n)
        for i in layers:
            for p in self.layers[i].parameters():
                p.requires_grad_(False)
                p.grad = None
        if self.tied:
            self.tied.leave()
        self.active, self.ops = None, None

    # -- one step -----------------------------------------------------------------------------------------------

    def step(self) -> dict:
        """Run one optimizer step (switching blocks first when a phase ends); returns its metrics."""
        s = self.step_index
        pos = position(self.plan, s)
        # A phase ends after steps_per_block steps (with one block there is nothing to switch to). A run resumed
        # from a checkpoint taken at a phase's end still has that phase's state, so it switches here too.
        if self.active is None or (pos["step_in_block"] == 0 and len(self.plan.blocks) > 1):
            if self.active is not None:
                self._leave()
            self._enter(pos["block"], switch=True)
        phase = self.schedule.phases[self.active]
        lr = lr_at(s, self.cfg)
        g, mb = self.plan.shape.grad_accum, self.plan.shape.micro_batch
        batches = self.data.next_step(mb, g, rank=self.world.rank, world=self.world.size)
        dev = self.target.device
        self.ops.begin_step([x.to(dev) for x, _ in batches], [y.to(dev) for _, y in batches], lr)
        start = self.tracer.begin_step(s, self.active)
        nxt = position(self.plan, s + 1)
        same_phase = s + 1 < self.run_end and (nxt["step_in_block"] != 0 or len(self.plan.blocks) == 1)
        ahead = self._early_reads(phase) if same_phase else ()
        self._carried = self.executor.run(phase.ops, self.ops, carried=self._carried, ahead=ahead,
                                          ahead_ctx=(s + 1, self.active))
        self.ops.end_step()
        if self.tied and self.tied.changes(self.plan.blocks[self.active].layers):
            self.tied.sync()  # the head's copy of a tied matrix follows the embedding's
        loss = self.ops.loss.item()
        grad_norm = self.optim.grad_norm.item() if self.optim.grad_norm is not None else 0.0
        seconds = self.tracer.end_step(s, self.active, start)
        meter = self.store.meter
        self.phase_peaks[self.active] = max(self.phase_peaks.get(self.active, 0), meter.peak_bytes)
        self.step_index = s + 1
        rec = {"step": s + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": self.optim.nonfinite,
               "block": self.active,
               "cycle": pos["cycle"], "step_in_block": pos["step_in_block"], "step_seconds": seconds,
               "tokens_per_s": self.plan.shape.tokens_per_step / seconds if seconds > 0 else 0.0,
               "device_peak_bytes": meter.peak_bytes}
        if self.target.cuda:
            rec["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(self.target.device)
        self.history.append(rec)
        return rec

    def _early_reads(self, phase) -> list:
        """The next step's first NVMe reads, issued at the end of this one: those that wait for nothing, of
        layers this phase never writes (below or above the block: frozen)."""
        block = self.plan.blocks[phase.block]
        written = set(block.layers) | ({self.tied.head} if self.tied and self.tied.changes(block.layers) else set())
        return [op for op in phase.ops if op.kind == "read_weights" and not op.deps and op.layer not in written]

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save(self) -> str:
        """A checkpoint of this step; with several ranks every rank calls it (runtime.checkpoint: weights once,
        the optimizer state once or per rank's shard, each rank's data position and RNG states)."""
        w = self.world
        weights = rmodel.state_dict(self.model_cfg, self.layouts, self.store) if w.leader else {}
        opt_tensors, opt_meta = self.optim.state_dict()
        s = self.step_index
        bad = [name for tensors in (weights, opt_tensors) for name, t in tensors.items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        where = failed_ranks(w, not bad)   # every rank learns whether any holds a NaN, so all stop alike
        if where:
            what = (f"{len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
                    if bad else f"rank{'s' if len(where) > 1 else ''} {', '.join(map(str, where))} hold NaN or inf")
            raise NonFiniteStop(f"at step {s} {what}; no checkpoint was written, {self._last_good()}. "
                                f"Lower --lr or --weight-decay and resume with --allow-changes.")
        meta = {"plan": resume_signature(self.plan), "position": position(self.plan, s), "active_block": self.active,
                "optimizer": opt_meta, "train": train_settings(self.cfg, self.data)}
        shards = memory.state_shards(self.plan)   # 1, or one shard per rank
        numel = {name: self.layouts[int(name[1:].split(".")[0])].numel for name in opt_tensors}  # "L{i}.state"
        path = save_checkpoint(self.cfg.ckpt_dir, s, weights=weights, optimizer=opt_tensors, meta=meta, world=w,
                               shards=shards, rank_meta={"data": self.data.state_dict(), "rng": capture_rng()},
                               flat_numel=numel if shards > 1 else None)
        if w.leader:
            try:
                dtype = "bfloat16" if self.target.weight_dtype == torch.bfloat16 else "float32"
                write_hf_config(path, self.model_cfg, dtype=dtype)
            except UserError:
                pass  # an architecture without a Hugging Face twin still resumes; it only lacks config.json
        return path

    def _last_good(self) -> str:
        """Where the last good state is, in words, for a message."""
        if not self.cfg.ckpt_dir:
            return "and no --ckpt-dir was given, so no earlier checkpoint exists"
        try:
            from runtime.checkpoint import resolve_step_dir
            return f"the last good checkpoint is '{resolve_step_dir(self.cfg.ckpt_dir)}'"
        except UserError:
            return f"and '{self.cfg.ckpt_dir}' holds no earlier checkpoint"

    def _check_finite(self, rec: dict) -> None:
        """After a step whose loss or gradient norm was NaN/inf (the optimizer applied no update): count it as
        skipped while --skip-nonfinite allows that many in a row, else stop with NonFiniteStop."""
        if not rec["skipped"]:
            self._bad_run = 0
            return
        self.skipped += 1
        self._bad_run += 1
        if self._bad_run <= self.cfg.skip_nonfinite:
            return
        why = (f"the loss is {rec['loss']} and the gradient norm {rec['grad_norm']} at step {rec['step']} (block "
               f"{rec['block']}, lr {rec['lr']:.3g})")
        if self.cfg.skip_nonfinite:
            why += f", the {self._bad_run}th non-finite step in a row (--skip-nonfinite {self.cfg.skip_nonfinite})"
        raise NonFiniteStop(f"{why}; training stopped without applying it and without saving, "
                            f"{self._last_good()}. Lower --lr or --weight-decay (resume with --allow-changes), "
                            f"or pass --skip-nonfinite N to skip up to N such steps in a row.")

    def _restore(self, ck: Checkpoint) -> None:
        meta = ck.meta
        check_same_plan(self.plan, ck, self.world.size)
        try:
            rmodel.load_state(self.model_cfg, self.layouts, self.store, ck.weights)
            self.optim.load_state_dict(ck.optimizer, meta["optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:  # a tensor missing, or of another shape
            why = " ".join(str(e).split())[:200]
            raise UserError(f"checkpoint '{ck.path}' does not fit this model: its tensors are missing or of "
                            f"another shape ({type(e).__name__}: {why}).") from None
        self.data.load_state_dict(meta["data"])
        restore_rng(meta["rng"])
        self.step_index = ck.step
        self.active = meta["active_block"]

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to cfg.steps (or cfg.stop_after steps of this invocation); 0, or 130/143 after a signal."""
        cfg = self.cfg
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, self.step_index + cfg.stop_after)
        self.run_end = end
        old = self._catch_signals()
        metrics = open(cfg.metrics_path, "a" if self.step_index else "w", encoding="utf-8") \
            if cfg.metrics_path else None
        progress = None if cfg.quiet else _Progress(total=cfg.steps, done=self.step_index)
        try:
            code = step_loop(self, end, metrics, progress.update if progress else None)
            if cfg.ckpt_dir:
                self.save()
        finally:
            if progress:
                progress.close()
            if metrics:
                metrics.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self._write_reports()
        return code

    def _catch_signals(self) -> dict:
        def stop(signum, frame):
            self._stop_signal = signum
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, stop)
            except ValueError:
                pass  # not the main thread: signals stay as they were
        return old

    def predicted_peaks(self) -> dict[int, int]:
        """Each phase's predicted device peak at the precision this run holds its weights in: the plan's own
        figures for bf16 (CUDA); on the CPU stand-in (float32 weights and gradients) the same schedule, with the
        plan's prefetch window, sized by the float32 profile, so the ledger compares like with like."""
        if self.target.weight_dtype == torch.bfloat16:
            return {p.block: p.peak_vram_bytes for p in self.plan.predicted.phases}
        from planner.planning import predict
        name = str(self.target.weight_dtype).replace("torch.", "")
        pred = predict(self.plan, profile_model(self.plan.model, dtype=name), window=self.schedule.window_layers)
        return {p.block: p.peak_vram_bytes for p in pred.phases}

    def predicted_host_bytes(self) -> int:
        """The plan's host RAM (planner.memory) at the precision this run holds its weights in, the figure the
        host ledger (store.host.peak_bytes) is held to."""
        name = str(self.target.weight_dtype).replace("torch.", "")
        return host_need_bytes(self.plan, name, cuda=self.target.cuda)

    def summary(self) -> dict:
        predicted = self.predicted_peaks()
        mma = torch.cuda.max_memory_allocated(self.target.device) if self.target.cuda else None
        out = self.tracer.summary(peak_device_bytes=max(self.phase_peaks.values(), default=0),
                                  phase_peak_bytes=self.phase_peaks, predicted_peak_bytes=predicted,
                                  max_memory_allocated_bytes=mma)
        out["host_peak_bytes"] = self.store.host.peak_bytes
        out["predicted_host_bytes"] = self.predicted_host_bytes()
        out["skipped_steps"] = self.skipped
        out["blocks"] = [[b.first, b.last] for b in self.plan.blocks]   # compare refuses another plan's
        out["device"] = str(self.target.device)
        out["weight_dtype"] = str(self.target.weight_dtype).replace("torch.", "")
        return out

    def _write_reports(self) -> None:
        if self.cfg.trace_path:
            write_json(self.cfg.trace_path, self.tracer.chrome_trace())
        if self.cfg.summary_path:
            write_json(self.cfg.summary_path, self.summary())

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight under its Hugging Face name, on the CPU (tests, export)."""
        return rmodel.state_dict(self.model_cfg, self.layouts, self.store)

    def close(self) -> None:
        self.streams.close()
        if self.target.cuda:
            torch.cuda.synchronize()  # no copy may still read a host buffer about to be unpinned
        self.store.close()


def step_loop(t, end: int, metrics, after_step=None) -> int:
    """The step loop of both trainers (this one and runtime.fsdp's): step until `end`, log each record to
    `metrics`, stop on a non-finite loss, checkpoint every cfg.ckpt_every steps; 0, or 128 + the signal that
    ended it. With several ranks, one rank's signal stops every rank after the same step (an all-reduce each
    step), so they all save the same checkpoint rather than one waiting in its save while the others train on."""
    cfg = t.cfg
    while t.step_index < end:
        rec = t.step()
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if after_step:
            after_step(rec)
        t._check_finite(rec)
        stop = max_over_ranks(t.world, t._stop_signal or 0)
        if stop:
            return 128 + stop
        if cfg.ckpt_dir and cfg.ckpt_every and t.step_index % cfg.ckpt_every == 0 and t.step_index < end:
            t.save()
    return 0


def train_settings(cfg: TrainConfig, data: TokenData) -> dict:
    """What a checkpoint records of the run's settings; a resume refuses changes to them (guards.check_settings)
    unless asked. steps is recorded too, though a resume may extend it."""
    a = cfg.adamw
    return {"steps": cfg.steps, "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup": cfg.warmup, "seed": cfg.seed,
            "weight_decay": a.weight_decay, "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps, "clip": a.clip,
            "data_order": data.order, "data_fingerprint": data.fingerprint()}


class _Progress:
    """A rich progress bar on stderr: loss, tokens/s, device peak, ETA."""

    def __init__(self, *, total: int, done: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def update(self, rec: dict) -> None:
        info = (f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:,.0f} tok/s  "
                f"peak {rec['device_peak_bytes'] / 2**20:,.1f} MiB  block {rec['block']}")
        self.bar.update(self.task, completed=rec["step"], info=info)

    def close(self) -> None:
        self.bar.stop()
