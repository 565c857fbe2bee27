"""The memory model: every byte a plan's training holds, on the device, in host RAM and on NVMe, in one place.

The ILP's constraints, the plan's predictions, the schedule's static bytes, the fast planner, the runtime's
guards, its device ledger and its trainer all read the rules here, so they cannot disagree.

Tiers are values (`Tier`): a name (what plan files store), the fraction of its capacity a plan may use, and the
links (schedule streams) that move bytes from it to the device and back. A second NVMe drive or a new link is one
new value here and its capacity field in `planner.hardware`.

Bytes per parameter of each tensor class (ZeRO's accounting, ../shared/reference/hardware.md): the weights in the
profile's dtype (bf16 in a plan: `LayerSizes.param_bytes`), gradients in the same dtype, an fp32 master copy
(4 B) and AdamW's two fp32 moments (8 B). A trained layer whose state is off the device also holds an fp32
gradient accumulator in host RAM (4 B), and the CPU AdamW a 4 B workspace (its square root) for the largest layer.

Host RAM of a plan, as the runtime allocates it (runtime/store.py, optim.py, activations.py, engine.py):
  pinned weights       every layer whose bf16 weights live on the cpu tier;
  offloaded activations one pinned buffer per offloaded layer, the size of its trainable saved set (the larger
                       of its two roles), reused by every micro-batch and step;
  NVMe staging         the prefetch window's worth of pinned buffers of the largest NVMe layer (weights read from
                       NVMe land there before the device copy);
  trained layers       per layer of the active block, for the whole phase: the optimizer state on the cpu tier
                       (12 B) and the fp32 gradient accumulator (4 B) when gradients leave the device; a state
                       stepped on the device with weights on NVMe keeps a pinned copy of the new weights to write;
  the step's window    what the host optimizer holds for one or two layers at a time, the schedule making a
                       layer's step (or its state's read) wait for the layer two before it to be done: NVMe
                       optimizer states read into host RAM (12 B each), the CPU AdamW's workspace (4 B), and on
                       CUDA one pinned staging buffer for device gradients on their way to the accumulator and the
                       updated weights (weight dtype) on their way to the device or NVMe; plus one NVMe layer's
                       weights read to seed a fresh state;
  kept state           keep_cpu: every trained layer's 12 B.
On the CPU stand-in (cuda=False) the "device" is host memory too; these are only the host-tier buffers, the ones
a CUDA run would hold in host RAM: no gradient staging, and updated fp32 weights are views of the fp32 master.

Clusters (planner.cluster). Device bytes are per GPU. Host RAM and NVMe are per node: each of the node's ranks
holds its own buffers above, except the frozen weights streamed from host memory or NVMe, which the node holds
once for all its ranks (runtime: one shared host copy, one set of files). Sharded optimizer state (data-parallel
BCD's choice, `state_shards`) leaves each rank shard_params(p, N) of a layer's master and moments, on whichever
tier; its gradients stay whole (reduced in place). Full-parameter training on N GPUs is FSDP / ZeRO-3 (`fsdp`):
weights, gradients and state all sharded, so a GPU holds
    params x (2 + 2 + 12) / N  +  the gathered whole layers of the prefetch window  +  activations
with the state (and the gradient shards) in host RAM instead when the plan offloads them. As torch's FSDP2 runs it
(runtime/fsdp.py), the ILP keeps each layer's weight shards on its state's tier (one offload policy), offloads
no activations (recompute instead) and puts nothing on NVMe.
"""
from __future__ import annotations

from enum import Enum

from planner.hardware import GIB, Hardware

MASTER_BYTES = 4          # fp32 master weights
MOMENT_BYTES = 8          # AdamW m and v, fp32
STATE_BYTES = MASTER_BYTES + MOMENT_BYTES
HOST_GRAD_BYTES = 4       # fp32 gradient accumulator on the host, when gradients leave the device
ADAM_WORKSPACE_BYTES = 4  # CPU AdamW: sqrt(v) of one layer, fp32
STATE_WINDOW = 2          # host-stepped layers in flight at once (the schedule's step -> step-two-before deps)


class Tier(str, Enum):
    """Where tensors live. Equal to (and hashed as) its name as a string, so plan files keep plain names."""
    GPU = "gpu"
    CPU = "cpu"
    NVME = "nvme"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def usable_fraction(self) -> float:
        """Of the tier's capacity, what a plan may fill: host RAM keeps 15% for the OS, the process and the
        page cache; a drive 5% for its filesystem. The device's own budget less reserve is `device_cap_bytes`."""
        return _SPEC[self][0]

    @property
    def to_device(self) -> tuple[str, ...]:
        """The links (schedule streams) bytes take from this tier to the device, in order."""
        return _SPEC[self][1]

    @property
    def from_device(self) -> tuple[str, ...]:
        return _SPEC[self][2]

    def capacity_bytes(self, hw: Hardware) -> int:
        return {Tier.GPU: hw.vram_bytes, Tier.CPU: int(hw.host.ram_gib * GIB),
                Tier.NVME: int(hw.host.nvme_gib * GIB)}[self]

    def usable_bytes(self, hw: Hardware) -> int:
        return int(self.capacity_bytes(hw) * self.usable_fraction)


_SPEC = {Tier.GPU: (1.0, (), ()), Tier.CPU: (0.85, ("h2d",), ("d2h",)),
         Tier.NVME: (0.95, ("nvme_read", "h2d"), ("d2h", "nvme_write"))}
RECOMPUTE = "recompute"   # an activation placement, not a tier: nothing is kept

WEIGHT_TIERS = (Tier.GPU, Tier.CPU, Tier.NVME)
STATE_TIERS = (Tier.GPU, Tier.CPU, Tier.NVME)
GRAD_TIERS = (Tier.GPU, Tier.CPU)
ACT_PLACES = (Tier.GPU, Tier.CPU, RECOMPUTE)


def kept_tier(switch_state: str) -> Tier | None:
    """Where a switch policy keeps a block's optimizer state between its phases (None: reset drops it)."""
    return {"keep_cpu": Tier.CPU, "keep_nvme": Tier.NVME}.get(switch_state)


def tiers(hw: Hardware) -> tuple[Tier, ...]:
    """The tiers this hardware offers (a tier with no capacity is absent), device first."""
    return tuple(t for t in Tier if t == Tier.GPU or t.capacity_bytes(hw) > 0)


def host_usable_bytes(hw: Hardware) -> int:
    return Tier.CPU.usable_bytes(hw)


def nvme_usable_bytes(hw: Hardware) -> int:
    return Tier.NVME.usable_bytes(hw)


# -- device --------------------------------------------------------------------------------------------------------

def device_cap_bytes(budget_bytes: int, reserve_bytes: int) -> int:
    """What a plan's schedule may use on the device: the budget less the reserve (CUDA context, allocator slack)."""
    return budget_bytes - reserve_bytes


def plan_cap_bytes(plan) -> int:
    return device_cap_bytes(plan.budget_bytes, plan.reserve_bytes)


def shard_params(params: int, shards: int) -> int:
    """Parameters of one rank's shard of a layer's optimizer state when the state is sharded over `shards` ranks:
    the flat parameter vector padded to a multiple of `shards` and cut evenly (so every rank's shard is alike).
    The one rule for a shard's size: memory, schedule and runtime all use it."""
    return -(-params // shards)


def state_shards(plan) -> int:
    """Ranks the active block's fp32 master and moments are cut over: the world with sharded state (BCD's
    ZeRO-1-style choice, and always for full-parameter training on several GPUs, FSDP), else 1."""
    return plan.world if plan.shard_state or fsdp(plan) else 1


def fsdp(plan) -> bool:
    """Full-parameter training on several GPUs runs as FSDP / ZeRO-3: weights, gradients and optimizer state
    all sharded over the ranks, each layer's weights all-gathered for each pass (planner.schedule)."""
    return plan.method == "full" and plan.world > 1


def weight_shard_bytes(param_bytes: int, params: int, shards: int) -> int:
    """Bytes of one rank's shard of a layer's weights (or gradients) in their dtype: shard_params of them."""
    return shard_params(params, shards) * (param_bytes // max(1, params)) if shards > 1 else param_bytes


def state_device_bytes(placements, layers, params, weight_bytes, *, shards: int = 1,
                       grad_shards: int = 1) -> dict[str, int]:
    """Device bytes a phase holds for its whole length besides the resident weights: the active block's master,
    moments and gradients where the plan keeps them on the device. params[i] / weight_bytes[i]: layer i's
    parameter count and bytes of its weights (gradients have the weights' dtype). `shards`: ranks the master
    and moments are cut over (state_shards); `grad_shards`: ranks the gradients are (FSDP keeps only its shard of
    each layer's gradient; data-parallel BCD reduces the whole gradient in place, so holds all of it)."""
    out = {"master": 0, "moments": 0, "grads": 0}
    for i in layers:
        pl = placements[i]
        p = shard_params(params[i], shards)
        out["master"] += p * MASTER_BYTES if pl.master == Tier.GPU else 0
        out["moments"] += p * MOMENT_BYTES if pl.moments == Tier.GPU else 0
        out["grads"] += weight_shard_bytes(weight_bytes[i], params[i], grad_shards) if pl.grads == Tier.GPU else 0
    return out


def trained_layer_device_bytes(params: int, param_bytes: int, state: str, shards: int = 1,
                               grad_shards: int = 1) -> int:
    """Device bytes of one trained layer's master, moments and gradients when its state lives on the device
    (state_device_bytes for one layer)."""
    if state != Tier.GPU:
        return 0
    return shard_params(params, shards) * STATE_BYTES + weight_shard_bytes(param_bytes, params, grad_shards)


def act_bytes(sz, act: str, role: str) -> int:
    """Device bytes a layer holds for backward while the rest of the pass runs: its saved set when kept, its
    input (the checkpoint) when recomputed, nothing once offloaded or below the block."""
    if role == "below":
        return 0
    return {Tier.GPU: sz.saved(role), Tier.CPU: 0, RECOMPUTE: sz.out_bytes}[act]


def transient_bytes(sizes, state: str) -> int:
    """The ILP's transient reserve on the device: the largest kernel workspace, two saved sets in flight to or
    from the host, one optimizer temporary (an fp32 gradient cast on the device, or two gradient copies on their
    way to the host) and two hidden states (a layer's input and output). The schedule's replay checks it."""
    dec = [s for s in sizes if s.kind == "decoder"]
    big = max(sizes, key=lambda s: s.params)
    ws = max(s.workspace_bytes for s in sizes)
    inflight = 2 * max(s.saved_bytes for s in dec) if dec else 0
    temp = big.params * MASTER_BYTES if state == Tier.GPU else 2 * big.param_bytes
    hidden = 2 * max(s.out_bytes for s in sizes)
    return ws + inflight + temp + hidden


def static_device_bytes(placements, layers, params, weight_bytes, *, shards: int = 1, grad_shards: int = 1,
                        weight_shards: int = 1) -> dict[str, int]:
    """Every device byte a phase holds from start to end, by class: resident weights (each rank's shard of them
    under FSDP: `weight_shards`), then state_device_bytes."""
    resident = sum(weight_shard_bytes(weight_bytes[p.layer], params[p.layer], weight_shards)
                   for p in placements if p.weights == Tier.GPU)
    return {"weights": resident, **state_device_bytes(placements, layers, params, weight_bytes, shards=shards,
                                                      grad_shards=grad_shards)}


def plan_shards(plan) -> dict[str, int]:
    """static_device_bytes' sharding keywords for a plan: state over the world when sharded; gradients and
    weights too under FSDP."""
    n = plan.world if fsdp(plan) else 1
    return {"shards": state_shards(plan), "grad_shards": n, "weight_shards": n}


def window_layers(plan, sizes) -> int:
    """Streamed layers resident on the device at once (the prefetch window), at least two."""
    if fsdp(plan):   # every layer is gathered; one streamed from off the device holds its loaded shard too
        streamed = [sizes[p.layer].param_bytes + (0 if p.weights == Tier.GPU else weight_shard_bytes(
            sizes[p.layer].param_bytes, sizes[p.layer].params, plan.world)) for p in plan.placements]
    else:
        streamed = [sizes[p.layer].param_bytes for p in plan.placements if p.weights != Tier.GPU]
    if not streamed:
        return 0
    return max(2, plan.prefetch_window_bytes // max(streamed))


# -- host RAM ------------------------------------------------------------------------------------------------------

def nvme_staging_bytes(window_layers_: int, largest_nvme_layer_bytes: int) -> int:
    """Pinned buffers NVMe weight reads land in: one per layer of the prefetch window (at least two), each the
    size of the largest layer read from NVMe (runtime.hostio.StagingPool)."""
    return max(2, window_layers_) * largest_nvme_layer_bytes if largest_nvme_layer_bytes else 0


def trained_layer_host_bytes(params: int, param_bytes: int, state: str, weights: str, shards: int = 1,
                             grad_shards: int = 1) -> int:
    """Host bytes one layer of the active block holds for the whole phase (module docstring: trained layers), on
    one rank: its shard of the state (`shards`) and of the fp32 gradient accumulator (`grad_shards`)."""
    if state == Tier.GPU:
        return param_bytes if weights == Tier.NVME else 0         # pinned copy of new weights for the NVMe write
    return (shard_params(params, shards) * (STATE_BYTES if state == Tier.CPU else 0)
            + shard_params(params, grad_shards) * HOST_GRAD_BYTES)


def step_host_bytes(max_params: int, max_param_bytes: int, state: str, *, nvme_weights: bool,
                    cuda: bool = True, shards: int = 1) -> int:
    """Host bytes of one or two layers at a time during a phase (module docstring: the step's window), from the
    largest trained layer's parameter count and weight bytes, on one rank stepping its shard (`shards`) of each
    layer. nvme_weights: a trained layer's weights live on NVMe (a fresh state's master is read from there)."""
    out = max_param_bytes if nvme_weights else 0
    p = shard_params(max_params, shards)
    if state == Tier.NVME:
        out += STATE_WINDOW * p * STATE_BYTES
    if state != Tier.GPU:
        out += p * ADAM_WORKSPACE_BYTES
        if cuda:   # one pinned gradient staging buffer; updated weights of STATE_WINDOW layers on their way out
            out += max_param_bytes + STATE_WINDOW * max_param_bytes
    return out


def host_breakdown(plan, sizes, *, cuda: bool = True, window: int | None = None,
                   ranks: int | None = None) -> dict[str, int]:
    """Host RAM of a plan by class (module docstring), at the phase that needs most, for one node: `ranks` ranks
    (default the plan's GPUs a node), each with its own buffers, and the frozen weights they stream from host
    memory held once for all of them (FSDP: each rank's shard). `sizes`: LayerSizes per layer (the profile's
    dtype sets the weight bytes); `window`: the prefetch window in layers (default the plan's)."""
    pls = plan.placements
    trained = sorted({i for b in plan.blocks for i in b.layers})
    wl = window_layers(plan, sizes) if window is None else window
    nvme_w = [sizes[p.layer].param_bytes for p in pls if p.weights == Tier.NVME]
    r = plan.cluster.gpus_per_node if ranks is None else ranks
    sh = plan_shards(plan)
    ws, gs, ss = sh["weight_shards"], sh["grad_shards"], sh["shards"]

    def block_bytes(b) -> int:
        return sum(trained_layer_host_bytes(sizes[i].params, sizes[i].param_bytes, pls[i].master, pls[i].weights,
                                            ss, gs) for i in b.layers)
    masters = {pls[i].master for i in trained}
    state = next((t for t in (Tier.NVME, Tier.CPU) if t in masters), Tier.GPU)   # the one needing most
    pinned = sum(weight_shard_bytes(sizes[p.layer].param_bytes, sizes[p.layer].params, ws)
                 for p in pls if p.weights == Tier.CPU)
    out = {
        "pinned_weights": pinned * r if ws > 1 else pinned,    # shared by the node's ranks (FSDP: a shard each)
        "offloaded_activations": r * sum(sizes[p.layer].saved_bytes for p in pls if p.activations == Tier.CPU),
        "nvme_staging": r * nvme_staging_bytes(wl, max(nvme_w, default=0)),
        "trained_layers": r * max(block_bytes(b) for b in plan.blocks),
        "step_window": r * step_host_bytes(max(sizes[i].params for i in trained),
                                           max(sizes[i].param_bytes for i in trained), state,
                                           nvme_weights=any(pls[i].weights == Tier.NVME for i in trained),
                                           cuda=cuda, shards=ss) if trained else 0,
        "kept_state": (r * sum(shard_params(sizes[i].params, ss) for i in trained) * STATE_BYTES
                       if plan.switch_state == "keep_cpu" else 0),
    }
    return out


def host_bytes(plan, sizes, *, cuda: bool = True, window: int | None = None, ranks: int | None = None) -> int:
    """Host RAM of a plan on one node (host_breakdown)."""
    return sum(host_breakdown(plan, sizes, cuda=cuda, window=window, ranks=ranks).values())


# -- NVMe ----------------------------------------------------------------------------------------------------------

def nvme_bytes(plan, sizes, *, ranks: int | None = None) -> int:
    """Bytes on one node's NVMe: weights on the nvme tier (once for the node's ranks; FSDP: a shard each), plus
    each rank's optimizer state files (its shard): the largest block's while its state lives there (the files of
    a block that is left go), every trained layer's under keep_nvme."""
    pls = plan.placements
    r = plan.cluster.gpus_per_node if ranks is None else ranks
    sh = plan_shards(plan)
    ws, ss = sh["weight_shards"], sh["shards"]
    w = sum(weight_shard_bytes(sizes[p.layer].param_bytes, sizes[p.layer].params, ws)
            for p in pls if p.weights == Tier.NVME) * (r if ws > 1 else 1)
    if plan.switch_state == "keep_nvme":
        return w + r * sum(shard_params(sizes[i].params, ss) for b in plan.blocks for i in b.layers) * STATE_BYTES
    biggest = max(sum(shard_params(sizes[i].params, ss) for i in b.layers if pls[i].master == Tier.NVME)
                  for b in plan.blocks)
    return w + r * biggest * STATE_BYTES
