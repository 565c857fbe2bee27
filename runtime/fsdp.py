"""Full-parameter training on N ranks through FSDP2: the baseline users compare BCD with.

    torchrun --nproc-per-node 2 .venv/bin/blockfit train --plan full2.json --data tokens.bin --steps 100

A plan with method "full" for N GPUs (`plan --method full --gpus N`) runs here instead of through the schedule
executor: PyTorch's own ZeRO-3 (`torch.distributed.fsdp.fully_shard`), so the figures BCD is held against are
those of the engine people actually use, not of a home-made one.

The model is planner.llama's LlamaModel (the BCD runtime's layers, Hugging Face names), built on the meta device,
sharded (`fully_shard` on each decoder layer, then on the root, which holds the embedding and the head), then
materialised: `to_empty` on the device, and each layer's weights made on the CPU one layer at a time by the
runtime's own rule (runtime.model.random_layers, or a safetensors checkpoint), every rank keeping only its dim-0
shard. So no rank ever holds the whole model, and the weights equal the BCD runtime's for the same seed.

Precision (MixedPrecisionPolicy): the sharded parameters are the fp32 master weights; each layer is all-gathered
in param_dtype for forward and backward (bf16 on CUDA, as the BCD runtime's weights; fp32 on the CPU stand-in, so
a CPU run can be compared bitwise with a plain fp32 loop: in bf16 a comparison would measure bf16 rounding, not
the sharding); gradients are reduce-scattered in fp32. Where the plan keeps optimizer state, master weights or
gradients in host memory, CPUOffloadPolicy keeps the shards there and AdamW steps them on the CPU (pinned only
on CUDA: `pin_memory()` needs an accelerator, and a CPU-only torch refuses it). FSDP2 has no NVMe tier: a plan
with anything on NVMe is refused. Activations the plan recomputes are checkpointed (torch.distributed's
composable `checkpoint`); activations it offloads to host memory stay on the device: torch's offload
(`save_on_cpu`) would copy every tensor saved for backward, the all-gathered weights too, to the host and back.

One optimizer step: rank r takes the r-th contiguous slice of the step's N x grad_accum x micro_batch windows
(the global batch), runs grad_accum micro-batches of loss / grad_accum, and FSDP2 reduce-scatters the gradients
with ReduceOp.AVG, so every shard holds the mean gradient of the global batch: what one rank accumulating
N x grad_accum micro-batches of the same windows holds. By default the reduce-scatter runs after every
micro-batch (each rank keeps only sharded gradients: ZeRO-3's memory, and the wire bytes a full plan on N GPUs
is priced with); `defer_reduce` keeps each rank's unsharded fp32 gradient across the micro-batches
(set_requires_gradient_sync(False) until the last one), a grad_accum-th of the traffic for a whole model's
gradient per rank. Then clip_grad_norm_ over the sharded gradients (its norm is a DTensor reduction over the
ranks), torch.optim.AdamW on the shards with the runtime's hyper-parameters and its learning-rate schedule
(runtime.trainer.lr_at), and one JSON line of metrics, with the global mean loss, from rank 0.

Checkpoints (the end of the run, every --ckpt-every steps, and after SIGINT/SIGTERM) gather the full state on
rank 0 (torch.distributed.checkpoint.state_dict, full_state_dict on the CPU) and write it through
runtime.checkpoint.save_checkpoint (temp directory, fsync, rename): the weights under Hugging Face names, AdamW's
moments as exp_avg/<name> and exp_avg_sq/<name>. A signal reaches the ranks at different moments, so whether to
stop is agreed on after every step (an all-reduce of one flag), and all ranks stop after the same step.
--resume loads the full state on every rank and keeps each rank's shard, so it continues bitwise; nothing in the
files depends on the number of ranks (a resume on another one, under a plan for it, is not tested yet). The cost
of full state: rank 0 holds 12 bytes a parameter of host RAM while it saves (fp32 weights and both moments; 84 GB
for 7B), and every rank as much while it resumes; torch.distributed.checkpoint's sharded format would avoid both.
Not supported here: --trace and --nvme-dir (exit 2).
"""
from __future__ import annotations

import contextlib
import math
import signal
import time

import torch
import torch.distributed as dist

from planner.errors import UserError
from planner.llama import LlamaModel
from planner.memory import Tier
from planner.plan import Plan
from runtime import dist as rdist
from runtime import model as rmodel
from runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, write_hf_config
from runtime.data import TokenData
from runtime.dist import World
from runtime.hf import load_layers_from_hf_state, read_safetensors_dir, source_name
from runtime.store import Target
from runtime.trace import write_json
from runtime.trainer import NonFiniteStop, TrainConfig, lr_at, step_loop, train_settings

METHOD = "full-fsdp2"   # the method a checkpoint, a summary and the metrics name


def check_plan(plan: Plan, world: World) -> None:
    """What this path trains: a full-parameter plan, for exactly this many ranks, with nothing on NVMe."""
    if plan.method != "full":
        raise UserError(f"the FSDP2 path trains full-parameter plans (method 'full'); this plan's method is "
                        f"'{plan.method}': `blockfit train` runs it through the BCD runtime.")
    if plan.world != world.size:
        raise UserError(f"the plan is for {plan.world} GPU(s) but this run has {world.size} rank(s); start it with "
                        f"`torchrun --nproc-per-node {plan.world} ... blockfit train` or make a plan for "
                        f"{world.size} GPU(s) (`plan --method full --gpus {world.size}`).")
    on_nvme = sorted({p.layer for p in plan.placements for t in (p.weights, p.master, p.moments, p.grads)
                      if t == Tier.NVME})
    if on_nvme:
        raise UserError(f"the plan keeps layers {on_nvme} (weights, optimizer state or gradients) on NVMe; FSDP2 "
                        f"offloads to host memory only. Make the plan with enough --host-ram for the sharded "
                        f"state, or train it on one GPU with the BCD runtime's full method.")


def offloads(plan: Plan) -> bool:
    """CPUOffloadPolicy when the plan keeps any master weights, moments or gradients in host memory. FSDP2
    offloads a whole fully_shard group (its sharded parameters, gradients and their AdamW step); one policy for
    the model keeps every parameter on one device, which clip_grad_norm_ and AdamW expect."""
    return any(t == Tier.CPU for p in plan.placements for t in (p.weights, p.master, p.moments, p.grads))


def _peer_error(e: BaseException) -> bool:
    """A collective that failed because the other side went away (gloo: connection closed or reset, a
    timeout; NCCL: a watchdog or remote error), not a bug in this rank."""
    text = str(e).lower()
    return any(k in text for k in ("connection", "timed out", "timeout", "peer", "gloo", "nccl", "socket"))


class FsdpTrainer:
    """One rank of an FSDP2 run. The default process group must be open (train() opens it)."""

    def __init__(self, plan: Plan, data: TokenData, cfg: TrainConfig, *, world: World, target: Target,
                 defer_reduce: bool = False, param_dtype: torch.dtype | None = None, resume: Checkpoint | None = None):
        from torch.distributed._composable import checkpoint as recompute
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        check_plan(plan, world)
        self.plan, self.data, self.cfg, self.world, self.target = plan, data, cfg, world, target
        self.defer_reduce = defer_reduce
        self.param_dtype = param_dtype or target.weight_dtype
        self.offload = offloads(plan)
        mcfg = plan.model
        mesh = init_device_mesh(target.device.type, (world.size,))
        with torch.device("meta"):
            self.model = LlamaModel(mcfg)
        layers = self.model.layers
        for p in plan.placements:
            if p.activations == "recompute":
                recompute(layers[p.layer])
        policy = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=self.param_dtype,
                                                                 reduce_dtype=torch.float32),
                      offload_policy=CPUOffloadPolicy(pin_memory=target.cuda) if self.offload else OffloadPolicy())
        for layer in layers[1:-1]:
            fully_shard(layer, **policy)
        fully_shard(self.model, **policy)
        self.model.to_empty(device="cpu" if self.offload else target.device)
        self._load(self._full_layers(resume.weights if resume else None))
        a = cfg.adamw
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(a.beta1, a.beta2), eps=a.eps,
                                     weight_decay=a.weight_decay)
        self.step_index = 0
        if resume:
            self._restore(resume)
        self.history: list[dict] = []
        self.skipped = 0
        self._bad_run = 0
        self._stop_signal: int | None = None

    # -- weights ------------------------------------------------------------------------------------------------

    def _full_layers(self, sd: dict[str, torch.Tensor] | None):
        """(index, {local name: full CPU tensor}) per layer: from `sd` (a checkpoint's) or --init-from, both under
        HF names and checked on a meta model first; else the runtime's random weights."""
        mcfg = self.plan.model
        if sd is None and self.cfg.init_from:
            sd = read_safetensors_dir(self.cfg.init_from)
        if sd is None:
            for i, layer in rmodel.random_layers(mcfg, seed=self.cfg.seed):
                yield i, {local: p.detach() for local, p in layer.named_parameters()}
            return
        load_layers_from_hf_state(rmodel.meta_layers(mcfg), sd, mcfg)  # names and shapes, as a UserError
        for i, layer in enumerate(rmodel.meta_layers(mcfg)):
            yield i, {local: sd[source_name(mcfg, i, local)] for local, _ in layer.named_parameters()}

    def _restore(self, ck: Checkpoint) -> None:
        """AdamW's moments and step, the data cursor and the step index from a checkpoint (check_resume's). The
        files hold full tensors: each rank keeps its shard, whatever the number of ranks that saved them."""
        from torch.distributed.checkpoint import state_dict as dcp
        opts = dcp.StateDictOptions(full_state_dict=True)
        osd = dcp.get_optimizer_state_dict(self.model, self.opt, options=opts)  # the FQNs, and empty state
        step = int(ck.meta["optimizer"]["step"])
        try:
            for group in osd["param_groups"]:
                for fqn in group["params"]:
                    hf = self._hf(fqn)
                    osd["state"][fqn] = {"step": torch.tensor(float(step)), "exp_avg": ck.optimizer[f"exp_avg/{hf}"],
                                         "exp_avg_sq": ck.optimizer[f"exp_avg_sq/{hf}"]}
        except KeyError as e:
            raise UserError(f"checkpoint '{ck.path}' lacks the optimizer tensor {e}; it is damaged or not an "
                            f"FSDP2 checkpoint of this model.") from None
        dcp.set_optimizer_state_dict(self.model, self.opt, osd, options=opts)
        self.data.load_state_dict(ck.meta["data"])
        self.step_index = ck.step

    @torch.no_grad()
    def _load(self, layers) -> None:
        """Copy full layers into the sharded parameters, one layer at a time: each rank keeps its shard, cut as
        FSDP2 cuts it (torch.chunk along dim 0: distribute_tensor with no source rank splits locally, no
        communication). A tied lm_head is the embedding's parameter, written twice with the same matrix."""
        from torch.distributed.tensor import distribute_tensor
        for i, full in layers:
            for local, p in self.model.layers[i].named_parameters(remove_duplicate=False):
                t = full[local].to(torch.float32)
                shard = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(shard)

    def _state(self, *, everywhere: bool):
        """(weights under HF names, optimizer tensors, optimizer meta), full, on the CPU: on every rank if
        `everywhere`, else on rank 0 only (the others get empty dicts). Collective: every rank calls it."""
        from torch.distributed.checkpoint import state_dict as dcp
        opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
        msd = dcp.get_model_state_dict(self.model, options=opts)
        osd = dcp.get_optimizer_state_dict(self.model, self.opt, options=opts)
        weights, tensors, steps = {}, {}, set()
        for fqn, t in msd.items():
            weights[self._hf(fqn)] = t.detach().to("cpu", copy=True)
        for fqn, st in osd.get("state", {}).items():
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{key}/{self._hf(fqn)}"] = st[key].detach().to("cpu", copy=True)
            steps.add(int(st["step"]))
        return weights, tensors, {"step": max(steps, default=0), "format": METHOD}

    def _hf(self, fqn: str) -> str:
        """A model FQN (layers.<i>.<local>) as the Hugging Face name it is saved under: a tied lm_head is the
        embedding (the same parameter, so the same tensor under one name, whichever FQN the state dict used)."""
        _, i, local = fqn.split(".", 2)
        return source_name(self.plan.model, int(i), local)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight under its Hugging Face name, full, on the CPU, on every rank (collective)."""
        return self._state(everywhere=True)[0]

    # -- one step -----------------------------------------------------------------------------------------------

    def _my_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's grad_accum micro-batches: the r-th contiguous slice of the step's global batch. Every rank
        reads the whole step's windows (int64 tokens: 1 MiB at 8 ranks x 8 x 2048, nothing next to the step's compute),
        so the data cursor, which a checkpoint saves, is the same everywhere."""
        mb, g, w, r = self.plan.shape.micro_batch, self.plan.shape.grad_accum, self.world.size, self.world.rank
        x, y = self.data.next_batch(mb * g * w)
        rows = slice(r * mb * g, (r + 1) * mb * g)
        return list(zip(x[rows].split(mb), y[rows].split(mb)))

    def step(self) -> dict:
        s, dev = self.step_index, self.target.device
        g = self.plan.shape.grad_accum
        lr = lr_at(s, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batches = self._my_batches()
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for j, (x, y) in enumerate(batches):
            if self.defer_reduce:
                self.model.set_requires_gradient_sync(j == g - 1)
            loss = self.model(x.to(dev), y.to(dev)) / g
            loss.backward()
            total += loss.detach()
        dist.all_reduce(total)                      # sum of the ranks' mean losses ...
        total /= self.world.size                    # ... over ranks: the global batch's mean
        clip = self.cfg.adamw.clip or math.inf      # max_norm inf scales by exactly 1.0: the norm, no clipping
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        loss_v, norm_v = total.item(), norm.item()
        bad = not (math.isfinite(loss_v) and math.isfinite(norm_v))
        if not bad:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.target.cuda:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        self.step_index = s + 1
        shape = self.plan.shape
        rec = {"step": s + 1, "loss": loss_v, "lr": lr, "grad_norm": norm_v, "skipped": bad, "block": 0,
               "cycle": s // self.plan.steps_per_block, "step_in_block": s % self.plan.steps_per_block,
               "step_seconds": seconds, "tokens_per_s": shape.tokens_per_step / seconds if seconds > 0 else 0.0,
               "device_peak_bytes": torch.cuda.max_memory_allocated(dev) if self.target.cuda else 0,
               "method": METHOD, "ranks": self.world.size}
        self.history.append(rec)
        return rec

    def _check_finite(self, rec: dict) -> None:
        """The trainer's rule: skip up to --skip-nonfinite non-finite steps in a row, then stop (exit 3). The loss
        and norm are reduced over the ranks, so every rank decides the same."""
        if not rec["skipped"]:
            self._bad_run = 0
            return
        self.skipped += 1
        self._bad_run += 1
        if self._bad_run > self.cfg.skip_nonfinite:
            raise NonFiniteStop(f"the loss is {rec['loss']} and the gradient norm {rec['grad_norm']} at step "
                                f"{rec['step']} (lr {rec['lr']:.3g}); training stopped without applying it and "
                                f"without saving. Lower --lr or --weight-decay, or pass --skip-nonfinite N.")

    # -- the loop -----------------------------------------------------------------------------------------------

    def save(self) -> str | None:
        """A checkpoint of the full state, written by rank 0 (module docstring); its directory there, else None.
        Collective: the ranks agree on whether rank 0's write succeeded, so none waits for a rank that failed."""
        weights, tensors, meta_opt = self._state(everywhere=False)
        path, error = None, ""
        if self.world.leader:
            try:
                bad = [k for k, t in {**weights, **tensors}.items() if not bool(torch.isfinite(t).all())]
                if bad:
                    raise NonFiniteStop(f"at step {self.step_index} {len(bad)} tensors hold NaN or inf "
                                        f"({', '.join(bad[:3])}); no checkpoint was written.")
                meta = {"method": METHOD, "ranks": self.world.size, "step": self.step_index,
                        "optimizer": meta_opt, "data": self.data.state_dict(),
                        "train": train_settings(self.cfg, self.data), "plan_fingerprint": self.plan.fingerprint}
                path = save_checkpoint(self.cfg.ckpt_dir, self.step_index, weights=weights, optimizer=tensors,
                                       meta=meta)
                with contextlib.suppress(UserError):  # an architecture without an HF twin has no config.json
                    write_hf_config(path, self.plan.model,
                                    dtype="bfloat16" if self.param_dtype == torch.bfloat16 else "float32")
            except UserError as e:
                error = str(e)
        failed = torch.tensor([1.0 if error else 0.0])
        dist.all_reduce(failed)  # gloo carries CPU tensors in either backend string
        if failed.item():
            raise UserError(error or "rank 0 could not write the checkpoint (see its message); this rank stops.")
        return path

    def run(self) -> int:
        """Train to cfg.steps (or cfg.stop_after steps); 0, or 128 + signal after SIGINT/SIGTERM (checkpointed)."""
        cfg = self.cfg
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, self.step_index + cfg.stop_after)
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                old[sig] = signal.signal(sig, lambda signum, frame: setattr(self, "_stop_signal", signum))
        metrics = open(cfg.metrics_path, "a" if self.step_index else "w", encoding="utf-8") \
            if cfg.metrics_path and self.world.leader else None
        def show(rec):
            if not cfg.quiet and self.world.leader:
                print(f"step {rec['step']}/{cfg.steps}  loss {rec['loss']:.4f}  "
                      f"{rec['tokens_per_s']:,.0f} tok/s", flush=True)
        try:
            code = step_loop(self, end, metrics, show)
            if cfg.ckpt_dir:
                self.save()
        finally:
            if metrics:
                metrics.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return code

    def summary(self) -> dict:
        steps = [r["step_seconds"] for r in self.history]
        return {"method": METHOD, "ranks": self.world.size, "steps": len(steps),
                "step_seconds_median": sorted(steps)[len(steps) // 2] if steps else None,
                "tokens_per_step": self.plan.shape.tokens_per_step, "param_dtype": str(self.param_dtype)[6:],
                "cpu_offload": self.offload, "defer_reduce": self.defer_reduce, "skipped_steps": self.skipped,
                "device": str(self.target.device), "max_memory_allocated_bytes": self.history[-1]["device_peak_bytes"]
                if self.history and self.target.cuda else None}


def check_resume(plan: Plan, resume: str | None, cfg: TrainConfig, data: TokenData, *,
                 allow_changes: bool = False) -> Checkpoint | None:
    """The checkpoint --resume names (a step directory, or the newest in --ckpt-dir), under the BCD runtime's
    rules: a directory that holds a run needs --resume, and the settings must match unless --allow-changes."""
    from runtime import guards
    if resume is None:
        return guards.check_resume(plan, None, cfg.ckpt_dir)  # refuses a directory that holds a run
    if not (resume or cfg.ckpt_dir):
        raise UserError("--resume needs a checkpoint: give its path, or --ckpt-dir holding one.")
    ck = load_checkpoint(resume or cfg.ckpt_dir)
    if ck.meta.get("method") != METHOD:
        raise UserError(f"checkpoint '{ck.path}' was not written by full-parameter training on N ranks (FSDP2): "
                        f"resume a single-GPU or BCD run without torchrun, or start from its weights with "
                        f"--init-from.")
    if ck.meta.get("plan_fingerprint") != plan.fingerprint:
        raise UserError(f"checkpoint '{ck.path}' was trained under a plan for another model (fingerprint "
                        f"{ck.meta.get('plan_fingerprint')}, this plan's {plan.fingerprint}).")
    guards.check_settings(ck, train_settings(cfg, data), steps=cfg.steps, allow_changes=allow_changes)
    return ck


def train(plan: Plan, data: TokenData, cfg: TrainConfig, *, world: World, resume: str | None = None,
          allow_changes: bool = False, summary_path: str | None = None, unsupported: dict | None = None,
          timeout_seconds: float = rdist.DEFAULT_TIMEOUT_SECONDS) -> int:
    """`blockfit train` for a full plan on N ranks: check, open the process group, train, write the summary.
    `unsupported`: flags given that this path does not execute ({flag: value}), refused with exit 2."""
    check_plan(plan, world)
    given = [flag for flag, v in (unsupported or {}).items() if v not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not supported for full-parameter "
                        f"training on {world.size} ranks (FSDP2, runtime/fsdp.py) yet.")
    data.require_windows(plan.shape.micro_batch * plan.shape.grad_accum * world.size)
    data.check_vocab(plan.model.vocab)
    ck = check_resume(plan, resume, cfg, data, allow_changes=allow_changes)
    if torch.cuda.is_available() and not cfg.force_cpu:
        torch.cuda.set_device(world.local_rank)
    target = Target.detect(force_cpu=cfg.force_cpu)
    # An outer caller (a test harness) may have opened the group already; else runtime.dist owns it.
    group = (contextlib.nullcontext() if dist.is_initialized()
             else rdist.process_group(world, cuda=target.cuda, timeout_seconds=timeout_seconds))
    with group:
        trainer = FsdpTrainer(plan, data, cfg, world=world, target=target, resume=ck)
        try:
            code = trainer.run()
        except (RuntimeError, dist.DistBackendError) as e:   # FSDP2's own collectives, when a peer is gone
            if "nan" in str(e).lower() or not _peer_error(e):
                raise
            raise rdist.peer_lost(world, "an FSDP2 collective", e) from None
        if summary_path and world.leader:
            write_json(summary_path, trainer.summary())
    return code
