"""The BCD optimizer: AdamW for the active block only, with its state on the tier the plan chose.

Only the active block's layers have an fp32 master copy, AdamW moments and gradients. A layer's state is one flat
fp32 buffer of 3 x params (master | exp_avg | exp_avg_sq): on the device (tier gpu), in pinned host memory (cpu), or
in a file on NVMe (nvme: read before the step and written after it, by the copy engine's NVMe threads).

The update is torch.optim.AdamW's, operation for operation (decoupled weight decay, lerp for the first moment,
Python-float bias corrections), applied with torch._foreach_* over per-parameter views of the flat buffers: one
call per operation for the whole layer, and the same elementwise kernels as the single-tensor reference, so a
CPU run is bitwise equal to torch.optim.AdamW.

When the active block changes, the switch policy decides what happens to the state: reset (dropped; the next
phase of the block starts from zero moments, as BAdam does), keep_cpu (kept in host RAM), keep_nvme (kept in files).

Sharded state (a data-parallel plan's shard_state): rank r of N keeps only its shard of each trained layer's state,
elements [r k, (r + 1) k) of the layer's flat buffer padded to N k, k = planner.memory.shard_params(numel, N), and
steps it as three flat tensors (AdamW is elementwise, so a shard that cuts through parameters is stepped exactly as
the whole would be, element for element; the padding has zero gradients and zero weights and stays zero).
runtime.reducer hands it the reduced gradient shard and all-gathers the updated weights.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from planner.errors import UserError
from planner.memory import STATE_BYTES, Tier, kept_tier, shard_params
from runtime.dist import SINGLE, World
from runtime.store import FlatLayout, TieredStore


@dataclass(frozen=True, kw_only=True)
class AdamWConfig:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0            # max global gradient norm of the block; 0 turns clipping off


def check_adamw(cfg: AdamWConfig, lr: float) -> None:
    """AdamW's hyper-parameters must keep the update finite and meaningful: betas in [0, 1) (beta = 1 divides by
    1 - beta^t = 0), eps > 0 (the denominator sqrt(v) may be 0), a finite weight decay with lr x wd < 1 (the
    decoupled decay multiplies the weights by 1 - lr x wd; at 1 or more it zeroes or flips them), a finite clip."""
    def bad(flag: str, v, want: str):
        raise UserError(f"{flag} must be {want}, got {v!r}.")
    for flag, v in (("--beta1", cfg.beta1), ("--beta2", cfg.beta2)):
        if not (math.isfinite(v) and 0 <= v < 1):
            bad(flag, v, "in [0, 1)")
    if not (math.isfinite(cfg.eps) and 0 < cfg.eps <= 1):
        bad("--eps", cfg.eps, "a positive number of at most 1 (AdamW's usual is 1e-8)")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        bad("--weight-decay", cfg.weight_decay, "a finite number >= 0")
    if lr * cfg.weight_decay >= 1:
        raise UserError(f"--weight-decay {cfg.weight_decay} with --lr {lr} makes lr x weight decay "
                        f"{lr * cfg.weight_decay:g} >= 1: every step would zero or flip the weights (AdamW's "
                        f"decoupled decay multiplies them by 1 - lr x wd). Typical values are 0 to 0.1.")
    if not (math.isfinite(cfg.clip) and 0 <= cfg.clip <= 1e6):
        bad("--clip", cfg.clip, "a number from 0 to 1e6 (0 turns clipping off)")


def adamw_(params, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float, cfg: AdamWConfig, denom=None) -> int:
    """One AdamW step in place over lists of fp32 tensors; returns the bytes of temporaries it held. `denom`:
    tensors shaped like exp_avg_sqs to hold sqrt(v) (the CPU optimizer's workspace) instead of temporaries."""
    if cfg.weight_decay:
        torch._foreach_mul_(params, 1 - lr * cfg.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - cfg.beta1)
    torch._foreach_mul_(exp_avg_sqs, cfg.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - cfg.beta2)
    step_f = float(step)
    step_size = lr / (1 - cfg.beta1 ** step_f)
    if denom is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        held = sum(d.numel() for d in denom) * 4
    else:
        for d, v in zip(denom, exp_avg_sqs):
            torch.sqrt(v, out=d)
        held = 0
    torch._foreach_div_(denom, (1 - cfg.beta2 ** step_f) ** 0.5)
    torch._foreach_add_(denom, cfg.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)
    return held


@dataclass
class LayerState:
    """Mutable, one per trained layer: the flat state buffer (None while it lives only in a file) and its step."""
    buf: torch.Tensor | None
    step: int = 0
    on_file: bool = False          # the newest state is the layer's NVMe state file


class BlockOptimizer:
    def __init__(self, *, cfg: AdamWConfig, store: TieredStore, layouts: list[FlatLayout], master_tiers: list[str],
                 grad_tiers: list[str], switch_state: str, world: World = SINGLE, shard: bool = False):
        self.cfg = cfg
        self.world = world
        self.shard = shard and world.distributed   # this rank holds 1/N of each layer's state
        self.norm_reduce = None                    # sharded: local norm -> the block's norm over every rank
        self.store = store
        self.target = store.target
        self.layouts = layouts
        self.tiers = master_tiers
        self.grad_tiers = grad_tiers
        self.switch_state = switch_state
        self.states: dict[int, LayerState] = {}    # the active block's layers
        self.kept: dict[int, LayerState] = {}      # keep_* policies: other blocks' states, where the policy keeps
        self.host_grads: dict[int, torch.Tensor] = {}
        self._grad_staging: torch.Tensor | None = None   # CUDA: pinned, where device gradients land on the host
        self.no_grad: dict[int, set[int]] = {}      # layer -> parameters without a gradient (a tied head's copy)
        self._clip_lock = threading.Lock()
        self._clip_done = False
        self.grad_norm: torch.Tensor | None = None
        self._workspace: torch.Tensor | None = None   # CPU AdamW's sqrt(v), the largest host-stepped layer's size
        self.nonfinite = False                     # this step's loss or gradient norm is NaN/inf: no update
        self._loss: torch.Tensor | None = None

    # -- where things are ---------------------------------------------------------------------------------------

    def state_numel(self, layer: int) -> int:
        """Elements of the layer's master (and of each moment) this rank holds: all, or its shard."""
        n = self.layouts[layer].numel
        return shard_params(n, self.world.size) if self.shard else n

    def grad_numel(self, layer: int) -> int:
        """Length of a flat gradient buffer: the layer's, padded to N shards when sharded."""
        return self.world.size * self.state_numel(layer) if self.shard else self.layouts[layer].numel

    def _empty(self, layer: int, tier: str) -> torch.Tensor:
        n = 3 * self.state_numel(layer)
        if tier == Tier.GPU:
            return torch.empty(n, dtype=torch.float32, device=self.target.device)
        return self.store.host.empty(n, torch.float32, pin=False)  # stepped by the CPU, never copied async

    def split(self, layer: int, buf: torch.Tensor) -> tuple[list, list, list]:
        n, lay = self.state_numel(layer), self.layouts[layer]
        if self.shard:  # a shard cuts through parameters: stepped as one flat tensor each
            return [buf[:n]], [buf[n:2 * n]], [buf[2 * n:]]
        return lay.views(buf[:n]), lay.views(buf[n:2 * n]), lay.views(buf[2 * n:])

    def state_bytes(self, layer: int) -> int:
        return self.state_numel(layer) * STATE_BYTES  # master | exp_avg | exp_avg_sq, fp32

    def _keeps_in_place(self, layer: int) -> bool:
        """The state already lives where the policy keeps it: no switch op moves it."""
        return self.tiers[layer] == kept_tier(self.switch_state)

    # -- phases -------------------------------------------------------------------------------------------------

    def fresh(self, layer: int, tier: str | None = None) -> LayerState:
        """State at the start of training a layer: master = the current weights, zero moments, step 0."""
        tier = tier or self.tiers[layer]
        buf = self._empty(layer, Tier.CPU if tier == Tier.NVME else tier)
        n, src = self.state_numel(layer), self.store.source(layer)
        if self.shard:
            lo = min(self.world.rank * n, src.numel())
            hi = min(lo + n, src.numel())
            buf[:hi - lo].copy_(src[lo:hi])
            buf[hi - lo:].zero_()
            return LayerState(buf=buf)
        buf[:n].copy_(src)
        buf[n:].zero_()
        return LayerState(buf=buf)

    def begin_phase(self, layers, *, switched: bool) -> None:
        """Make every layer of the new block ready. `switched`: the schedule's load_state ops bring kept state in
        (load_kept) for the layers whose state moves; a state kept in place is taken back here; the rest start
        fresh. An NVMe state starts fresh lazily, at its first read_state, so it is never written unstepped."""
        for i in layers:
            if i in self.states:
                continue  # resumed from a checkpoint in the middle of this phase
            if self._keeps_in_place(i) and i in self.kept:
                self.states[i] = self.kept.pop(i)
            elif switched and not self._keeps_in_place(i):
                continue  # its load_state op fills it
            else:
                self.states[i] = LayerState(buf=None) if self.tiers[i] == Tier.NVME else self.fresh(i)

    def end_phase(self, layers, *, switched: bool) -> None:
        """Leave a block: keep its state as the policy says (save_kept ops run before this when `switched`)."""
        for i in layers:
            st = self.states.pop(i, None)
            if st is not None and self.switch_state != "reset" and (self._keeps_in_place(i) or not switched):
                self.kept[i] = st
            elif st is not None and st.on_file:
                self.store.files.remove(f"state-L{i}")  # the state went elsewhere or was dropped: free the drive
        self.host_grads.clear()

    def load_kept(self, layer: int) -> None:
        """Switch op 'load state': the kept state onto the master tier (fresh if the block was never trained)."""
        kept = self.kept.pop(layer, None)
        tier = self.tiers[layer]
        if kept is None:
            self.states[layer] = LayerState(buf=None) if tier == Tier.NVME else self.fresh(layer)
            return
        buf = kept.buf if kept.buf is not None else self._read_file(layer, "kept")
        if tier == Tier.NVME:
            self.store.files.write(f"state-L{layer}", buf)
            self.states[layer] = LayerState(buf=None, step=kept.step, on_file=True)
        elif tier == Tier.GPU:
            self.states[layer] = LayerState(buf=buf.to(self.target.device), step=kept.step)
        else:
            self.states[layer] = LayerState(buf=buf, step=kept.step)

    def save_kept(self, layer: int) -> None:
        """Switch op 'save state': the layer's state to where the policy keeps it."""
        st = self.states.get(layer)
        if st is None:
            return
        buf = st.buf if st.buf is not None else (self._read_file(layer, "state") if st.on_file else None)
        if buf is None:
            return  # never stepped: nothing worth keeping
        if self.switch_state == "keep_nvme":
            self.store.files.write(f"kept-L{layer}", buf.to("cpu"))
            self.kept[layer] = LayerState(buf=None, step=st.step, on_file=True)
        else:
            host = self.store.host.empty(buf.numel(), torch.float32, pin=False)
            host.copy_(buf)
            self.kept[layer] = LayerState(buf=host, step=st.step)

    def _read_file(self, layer: int, kind: str) -> torch.Tensor:
        return self.store.files.read(f"{kind}-L{layer}", self._empty(layer, "cpu"))

    # -- NVMe state ---------------------------------------------------------------------------------------------

    def read_state(self, layer: int) -> None:
        st = self.states[layer]
        st.buf = self._read_file(layer, "state") if st.on_file else self.fresh(layer, "nvme").buf

    def write_state(self, layer: int) -> None:
        st = self.states[layer]
        self.store.files.write(f"state-L{layer}", st.buf)
        st.buf, st.on_file = None, True

    # -- gradients ----------------------------------------------------------------------------------------------

    def begin_step(self, loss: torch.Tensor | None = None) -> None:
        """A new step; `loss` is the step's loss tensor, complete by the time the first optimizer op clips."""
        self._clip_done = False
        self.grad_norm = None
        self.nonfinite = False
        self._loss = loss

    def offload_grads(self, layer: int, grads: list[torch.Tensor], first: bool) -> None:
        """Gradient op 'grad': one micro-batch's device gradients into the layer's host accumulator (fp32).
        On CUDA this runs on the d2h worker: an async copy to pinned memory, a wait on it, then the CPU adds."""
        lay = self.layouts[layer]
        if layer not in self.host_grads:  # zeroed once: alignment gaps and shard padding are reduced too
            self.host_grads[layer] = self.store.host.empty(self.grad_numel(layer), torch.float32, pin=False).zero_()
        self.no_grad[layer] = {k for k, g in enumerate(grads) if g is None}
        acc = lay.views(self.host_grads[layer])
        if self.target.cuda:
            # one pinned staging buffer for every layer, the largest's size: the d2h worker is one thread and
            # waits for each copy, so a layer's gradients are added before the next layer's arrive
            tmp = self._grad_staging
            if tmp is None or tmp.numel() < lay.numel:
                if tmp is not None:
                    self.store.host.release(tmp)
                tmp = self._grad_staging = None
                dtype = next(g for g in grads if g is not None).dtype  # a tied head's copy has none
                tmp = self._grad_staging = self.store.host.empty(lay.numel, dtype)
            views = lay.views(tmp)
            for v, g in zip(views, grads):
                if g is not None:
                    v.copy_(g, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            grads = [None if g is None else v for v, g in zip(views, grads)]
        for a, g in zip(acc, grads):
            if g is None:
                continue
            if first:
                a.copy_(g)
            else:
                a.add_(g)

    def grads(self, layer: int, params) -> list[torch.Tensor | None]:
        """The layer's gradients in layout order; None for a parameter that has none (a tied head's copy of the
        matrix, frozen while the head's block trains: only the embedding's copy is stepped)."""
        if self.grad_tiers[layer] == Tier.CPU:
            none = self.no_grad.get(layer, set())
            return [None if k in none else g for k, g in enumerate(self.layouts[layer].views(self.host_grads[layer]))]
        return [p.grad for p in params]

    def clip(self, block_grads) -> None:
        """The block's global gradient norm, and clipping to cfg.clip, once per step: the first optimizer op
        does it (every gradient of the block is complete by then) and the others find it done. `block_grads()`
        lists the block's gradients; it is called under the lock and only by that first op, so no thread reads
        a layer's .grad while another layer's op clears its own. Same arithmetic as clip_grad_norm_.
        A non-finite norm (or loss) marks the step: step_layer then leaves every weight and moment as it was,
        so a NaN never reaches the state (the trainer stops, or counts the step as skipped)."""
        with self._clip_lock:
            if self._clip_done:
                return
            grads = [g for gs in block_grads() for g in gs if g is not None]
            total = torch.nn.utils.get_total_norm(grads)
            if self.norm_reduce is not None:  # sharded: each rank holds a part of the block's gradient
                total = self.norm_reduce(total)
            loss = self._loss
            finite = bool(torch.isfinite(total)) and (loss is None or bool(torch.isfinite(loss)))
            self.nonfinite = not finite
            if self.cfg.clip and finite:
                coef = torch.clamp(self.cfg.clip / (total + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(coef.to(g.device))
            self.grad_norm = total
            self._clip_done = True

    # -- the update ---------------------------------------------------------------------------------------------

    def step_layer(self, layer: int, grads: list[torch.Tensor], lr: float) -> tuple[torch.Tensor, int]:
        """AdamW on the layer's state where it lives; returns (new weights as a flat tensor in the weight dtype
        on the state's device, bytes of temporaries held on that device)."""
        st = self.states[layer]
        dev = st.buf.device
        n = self.state_numel(layer)
        if self.nonfinite:  # a bad step: weights and moments stay as they were
            return st.buf[:n].to(self.target.weight_dtype), 0
        master, m, v = self.split(layer, st.buf)
        denom = self._denom(layer) if self.tiers[layer] != Tier.GPU else None
        keep = [k for k, g in enumerate(grads) if g is not None]  # a parameter without a gradient is not stepped
        if len(keep) < len(grads):
            master, m, v, grads = ([x[k] for k in keep] for x in (master, m, v, grads))
            denom = None if denom is None else [denom[k] for k in keep]
        st.step += 1
        if self.target.cuda and dev.type == "cuda":
            # one parameter at a time bounds the temporaries (the sqrt and the fp32 gradient) to the largest
            transient = max(adamw_([p], [g.to(dev, torch.float32)], [a], [b], step=st.step, lr=lr, cfg=self.cfg) * 2
                            for p, g, a, b in zip(master, grads, m, v))
        else:
            grads = [g.to(dev, torch.float32) for g in grads]
            transient = adamw_(master, grads, m, v, step=st.step, lr=lr, cfg=self.cfg, denom=denom)
        return st.buf[:n].to(self.target.weight_dtype), transient

    def _denom(self, layer: int) -> list[torch.Tensor]:
        """The CPU AdamW's workspace as views shaped like the layer's parameters (one buffer, reused: the host
        optimizer steps one layer at a time on its stream)."""
        n = self.state_numel(layer)
        if self._workspace is None or self._workspace.numel() < n:
            self._workspace = None
            self._workspace = self.store.host.empty(n, torch.float32, pin=False)
        return [self._workspace[:n]] if self.shard else self.layouts[layer].views(self._workspace)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = {}, {}
        for where, states in (("active", self.states), ("kept", self.kept)):
            for i, st in states.items():
                if st.buf is not None:
                    buf = st.buf.to("cpu", copy=True)
                elif st.on_file:
                    name = "state" if where == "active" or self._keeps_in_place(i) else "kept"
                    buf = self._read_file(i, name).clone()
                else:
                    continue  # fresh and never stepped
                tensors[f"L{i}.state"] = buf
                meta[str(i)] = {"step": st.step, "where": where}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.states.clear()
        self.kept.clear()
        for key, info in meta.items():
            i = int(key)
            buf = tensors[f"L{i}.state"].to(torch.float32)
            if info["where"] == "active":
                tier = self.tiers[i]
                if tier == Tier.NVME:
                    self.store.files.write(f"state-L{i}", buf)
                    self.states[i] = LayerState(buf=None, step=info["step"], on_file=True)
                else:
                    dst = self._empty(i, tier)
                    dst.copy_(buf)
                    self.states[i] = LayerState(buf=dst, step=info["step"])
            elif self.switch_state == "keep_nvme":
                self.store.files.write(f"{'state' if self._keeps_in_place(i) else 'kept'}-L{i}", buf)
                self.kept[i] = LayerState(buf=None, step=info["step"], on_file=True)
            else:
                dst = self._empty(i, "cpu")
                dst.copy_(buf)
                self.kept[i] = LayerState(buf=dst, step=info["step"])
