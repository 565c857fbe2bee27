"""`plan` / `blockfit plan`: what fits on this GPU and how fast.

    plan --model 7b --gpu rtx4090 --vram 24
    plan --model 70b --gpu rtx4090 --vram 24 --host-ram 256 --nvme 2000 --out p.json
    plan --model path/to/config.json --gpu a100-80g --compare
    plan --model 7b --gpu rtx4090 --gpus 8                                   # one box of 8 cards, data parallel
    plan --model 7b --gpu a100-80g --gpus 16 --nodes 2 --interconnect ib-hdr  # two nodes
    plan --model 7b --gpu rtx4090 --gpus 8 --method full                     # FSDP / ZeRO-3 over the 8

--batch is the global batch: sequences per optimizer step over all GPUs; each GPU runs batch / gpus of them.
"""
from __future__ import annotations

import json
import sys

from planner.errors import UserError, check_positive
from planner.hardware import GIB, make_hardware
from planner.models import load_model_config
from planner.plan import OBJECTIVES, ORDERS, SWITCH_POLICIES, Plan, write_atomic
from planner.units import SIZE_HELP, size_gib
from planner.wear import wear_warning


def add_hardware_args(p) -> None:
    """Hardware flags shared by plan, simulate and sweep."""
    p.add_argument("--gpu", default=None, help="catalog GPU (rtx3090, rtx4090, a100-80g, h100-sxm, ...)")
    p.add_argument("--hardware", default=None, help="a hardware profile written by `blockfit calibrate`")
    p.add_argument("--vram", default=None, help=f"VRAM budget ({SIZE_HELP}; default: the GPU's)")
    p.add_argument("--host-ram", default=None, help=f"host RAM ({SIZE_HELP}; default 64)")
    p.add_argument("--nvme", default=None, help=f"NVMe capacity for the plan ({SIZE_HELP}; default 0: none)")
    p.add_argument("--pcie-gbps", type=float, default=None, help="achieved pinned host<->device GB/s")
    p.add_argument("--nvme-read-gbps", type=float, default=None)
    p.add_argument("--nvme-write-gbps", type=float, default=None)
    p.add_argument("--cpu-adam", type=float, default=None, help="CPU AdamW parameters per second")
    p.add_argument("--nvme-tbw", type=float, default=None,
                   help="the NVMe drive's endurance in TB written (default 1200, a 2 TB Gen4 drive's rating); "
                        "the plan warns when a day's writes exceed the drive's daily share over five years")


def add_cluster_args(p) -> None:
    """Cluster flags (planner.cluster): how many GPUs on how many nodes, and the links between them."""
    from planner.cluster import DEFAULT_INTERCONNECT, INTERCONNECTS
    p.add_argument("--gpus", type=int, default=1, help="GPUs in all, data parallel (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over, evenly (default 1)")
    p.add_argument("--interconnect", default=None,
                   help=f"link between nodes: {', '.join(INTERCONNECTS)} (default {DEFAULT_INTERCONNECT})")
    p.add_argument("--interconnect-gbps", type=float, default=None,
                   help="... or a custom link between nodes, GB/s per direction per port")
    p.add_argument("--ports-per-node", type=int, default=None,
                   help="inter-node ports per node (default: one per GPU with NVLink, else one)")
    p.add_argument("--shard-state", choices=("on", "off", "auto"), default="auto",
                   help="bcd on 2+ GPUs: shard the active block's optimizer state over the GPUs (reduce-scatter, "
                        "step a shard, all-gather), or not; auto: the planner chooses (default)")


def cluster_request_args(a) -> dict:
    """Request fields from the cluster flags, checked here (exit 2 with one paragraph)."""
    for flag, v, top in (("--gpus", a.gpus, 1 << 16), ("--nodes", a.nodes, 1 << 12),
                         ("--ports-per-node", a.ports_per_node, 64)):
        check_positive(flag, v, integer=True, upper=top)
    if a.interconnect is not None and a.interconnect_gbps is not None:
        raise UserError("give --interconnect NAME or --interconnect-gbps X, not both.")
    check_positive("--interconnect-gbps", a.interconnect_gbps, upper=10000)
    if a.nodes > a.gpus:
        raise UserError(f"--nodes {a.nodes} is more than --gpus {a.gpus}: --gpus counts the GPUs in all, "
                        "at least one a node.")
    if a.nodes == 1 and (a.interconnect is not None or a.interconnect_gbps is not None):
        raise UserError("--interconnect / --interconnect-gbps are the link between nodes; give --nodes 2 or more.")
    if a.shard_state == "on" and a.gpus == 1:
        raise UserError("--shard-state on shards optimizer state over several GPUs; give --gpus 2 or more.")
    return dict(gpus=a.gpus, nodes=a.nodes, interconnect=a.interconnect, interconnect_gbps=a.interconnect_gbps,
                ports_per_node=a.ports_per_node, shard_state={"on": True, "off": False}.get(a.shard_state))


def hardware_from_args(a):
    return make_hardware(gpu=a.gpu, hardware_file=a.hardware, vram_gib=a.vram, host_ram_gib=a.host_ram,
                         nvme_gib=a.nvme, pcie_gbps=a.pcie_gbps, nvme_read_gbps=a.nvme_read_gbps,
                         nvme_write_gbps=a.nvme_write_gbps, cpu_adam_params_per_s=a.cpu_adam, nvme_tbw=a.nvme_tbw)


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan BCD training to fit a VRAM budget", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="7b, 8b, 13b, 70b, 1b, tiny, or a HF config.json")
    add_hardware_args(p)
    p.add_argument("--reserve", default=1.5, help=f"kept free for CUDA context and slack ({SIZE_HELP}; default 1.5)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--batch", type=int, default=8,
                   help="sequences per optimizer step over all GPUs (the global batch; each runs batch / gpus)")
    p.add_argument("--micro-batch", type=int, default=None, help="fix the micro-batch (default: chosen)")
    p.add_argument("--method", choices=["bcd", "full"], default="bcd")
    p.add_argument("--compare", action="store_true", help="plan BCD and full-parameter training side by side")
    p.add_argument("--steps-per-block", type=int, default=50)
    p.add_argument("--order", choices=ORDERS, default="ascending")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switch-state", choices=SWITCH_POLICIES, default="reset",
                   help="optimizer state of a block when training moves on")
    p.add_argument("--max-blocks", type=int, default=None, help="bcd: at most this many blocks")
    p.add_argument("--min-blocks", type=int, default=None,
                   help="bcd: at least this many blocks (otherwise the objective chooses the count)")
    p.add_argument("--blocks", type=int, default=None, help="bcd: exactly this many blocks")
    p.add_argument("--max-nvme-writes-per-day", default=None,
                   help=f"cap on bytes written to NVMe per day of training ({SIZE_HELP}, e.g. 10TB); a plan "
                        "over it is replaced by one without NVMe")
    p.add_argument("--train-embeddings", action="store_true",
                   help="bcd: train the embedding and the head in blocks too (pretraining; default: frozen)")
    p.add_argument("--objective", choices=OBJECTIVES, default="tokens",
                   help="tokens: most training tokens per second (default); cycle: shortest time to train every "
                        "layer once per --steps-per-block steps (favours the fewest blocks)")
    p.add_argument("--work-limit", type=float, default=None,
                   help="solver work for the whole search, in CP-SAT deterministic seconds (default 1.6): the "
                        "same command gives the same plan on any machine")
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="wall-clock safety net in seconds; the plan says so if it stopped the search")
    add_cluster_args(p)
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    p.add_argument("--json", action="store_true", help="print machine-readable output")
    p.set_defaults(func=run)


def request_from_args(a, method: str):
    from planner.planning import Request
    reserve_gib = size_gib("--reserve", a.reserve, upper_gib=1024)
    check_positive("--seq", a.seq, integer=True, upper=1 << 20)
    check_positive("--batch", a.batch, integer=True, upper=1 << 16)
    check_positive("--micro-batch", a.micro_batch, integer=True, upper=1 << 16)
    check_positive("--steps-per-block", a.steps_per_block, integer=True, upper=10**7)
    check_positive("--max-blocks", a.max_blocks, integer=True, upper=10**4)
    check_positive("--min-blocks", a.min_blocks, integer=True, upper=10**4)
    check_positive("--blocks", a.blocks, integer=True, upper=10**4)
    if a.blocks and (a.min_blocks or a.max_blocks):
        raise UserError("--blocks N fixes the block count: give it alone, or --min-blocks / --max-blocks.")
    lo, hi = (a.blocks, a.blocks) if a.blocks else (a.min_blocks, a.max_blocks)
    if lo and hi and lo > hi:
        raise UserError(f"--min-blocks {lo} is more than --max-blocks {hi}.")
    check_positive("--time-limit", a.time_limit, upper=86400)
    check_positive("--work-limit", a.work_limit, upper=86400)
    if not 0 <= a.seed < 1 << 63:
        raise UserError(f"--seed must be an integer from 0 to 2^63 - 1, got {a.seed}.")
    vram_gib = size_gib("--vram", a.vram, upper_gib=4096)
    cap_gib = size_gib("--max-nvme-writes-per-day", a.max_nvme_writes_per_day, allow_zero=True, upper_gib=1e9)
    return Request(method=method, vram_gib=vram_gib, reserve_gib=reserve_gib, seq_len=a.seq, batch=a.batch,
                   micro_batch=a.micro_batch, steps_per_block=a.steps_per_block, order=a.order, seed=a.seed,
                   switch_state=a.switch_state, objective=getattr(a, "objective", "tokens"),
                   work_limit=getattr(a, "work_limit", None), time_limit_s=a.time_limit, max_blocks=hi,
                   min_blocks=lo, max_nvme_write_bytes_per_day=None if cap_gib is None else cap_gib * GIB,
                   train_embeddings=getattr(a, "train_embeddings", False),
                   **(cluster_request_args(a) if hasattr(a, "gpus") else {}))


def run(a) -> int:
    from tools.simulate_cmd import check_writable
    check_writable(a.out)
    cfg = load_model_config(a.model)
    hw = hardware_from_args(a)
    from planner.planning import make_plan
    from planner.profile import profile_model
    prof = profile_model(cfg)
    methods = ["bcd", "full"] if a.compare else [a.method]
    plans: dict[str, Plan | UserError] = {}
    for m in methods:
        try:
            plans[m] = make_plan(cfg, hw, request_from_args(a, m), profile=prof)
        except UserError as e:
            if not a.compare:
                raise
            plans[m] = e
    main = plans[methods[0]]
    if isinstance(main, UserError):
        raise main
    if a.out is not None:
        write_atomic(a.out, main.to_json() + "\n")
    if a.json:
        out = {m: (p.to_dict() if isinstance(p, Plan) else {"error": str(p)}) for m, p in plans.items()}
        print(json.dumps(out if a.compare else out[methods[0]], indent=1))
        warning = wear_warning(main.predicted.nvme_write_bytes_per_day, main.hardware.host.nvme_tbw)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    from tools.plan_view import show_compare, show_plan
    show_plan(main, prof)
    if a.compare:
        show_compare(plans)
    if a.out:
        print(f"plan written to {a.out}")
    return 0
