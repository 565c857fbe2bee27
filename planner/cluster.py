"""Clusters: how many GPUs, on how many nodes, joined by which links, and what a collective costs on them.

This module owns the world size. The plan carries a `Cluster`; the schedule emits collectives as ops on the
`net` stream; the ILP, the simulator and the runtime's byte counts all price or count them with the functions
here, so their numbers can be compared.

Collective costs follow nccl-tests' conventions (hardware.md, "Clusters"): a ring all-reduce of S bytes over N
ranks sends and receives 2(N-1)/N x S per rank; a reduce-scatter or an all-gather (N-1)/N x S. Over several
nodes the collective is hierarchical: the intra-node ring moves its share over the node's link, and the
inter-node ring moves what crosses nodes over the slower network; the time is bounded by the slower level, so
we price max(intra, inter) plus one latency per ring step.

Link figures are per GPU and per direction, in GB/s (10^9 bytes/s). Sources sit beside each value.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from planner.errors import UserError, closest
from planner.hardware import GPU, Hardware, Link

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")

# Inter-node links, per port, per direction (hardware.md, "Clusters": InfiniBand HDR 200 Gb/s = 25 GB/s, NDR
# 400 Gb/s = 50 GB/s; Ethernet 25/100 Gb/s = 3.1/12.5 GB/s, before protocol overhead). A latency of 5 us for
# InfiniBand and 20 us for TCP over Ethernet per message (typical; unverified, `blockfit calibrate` measures).
INTERCONNECTS: dict[str, Link] = {
    "eth25": Link(name="eth25", gbps=3.125, latency_s=20e-6),
    "eth100": Link(name="eth100", gbps=12.5, latency_s=20e-6),
    "eth200": Link(name="eth200", gbps=25.0, latency_s=20e-6),
    "eth400": Link(name="eth400", gbps=50.0, latency_s=20e-6),
    "ib-hdr": Link(name="ib-hdr", gbps=25.0, latency_s=5e-6),
    "ib-ndr": Link(name="ib-ndr", gbps=50.0, latency_s=5e-6),
}
DEFAULT_INTERCONNECT = "eth100"   # a budget machine's one fast port (hardware.md)

# Without NVLink (RTX 3090/4090/5090, L40S, PCIe cards), NCCL goes through host memory over PCIe: GeForce cards
# have peer-to-peer disabled by the stock driver. hardware.md says to plan below 25 GB/s per card: half the
# pinned host-to-device figure, since every byte crosses PCIe twice (up into host memory, down to the peer).
PCIE_PEER_FRACTION = 0.5


def intra_link(gpu: GPU) -> Link:
    """The path between two GPUs of one node: NVLink where the card has it (half its total per direction,
    hardware.md), else through host memory over PCIe."""
    if gpu.nvlink_gbps > 0:
        return Link(name=f"nvlink-{gpu.id}", gbps=gpu.nvlink_gbps / 2, latency_s=3e-6)
    return Link(name="pcie-host", gbps=min(gpu.h2d_gbps, gpu.d2h_gbps) * PCIE_PEER_FRACTION, latency_s=10e-6)


def interconnect(name: str | None = None, gbps: float | None = None) -> Link:
    """The inter-node link by catalog name, or a custom one at `gbps` GB/s per direction."""
    if gbps is not None:
        if not (gbps > 0 and gbps < float("inf")):
            raise UserError(f"--interconnect-gbps must be a positive number of GB/s, not {gbps}.")
        return Link(name=f"custom-{gbps:g}", gbps=float(gbps), latency_s=20e-6)
    name = name or DEFAULT_INTERCONNECT
    if name not in INTERCONNECTS:
        raise UserError(f"unknown interconnect '{name}'{closest(name, INTERCONNECTS)}; known: "
                        f"{', '.join(INTERCONNECTS)} (or give --interconnect-gbps).")
    return INTERCONNECTS[name]


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """N GPUs on M nodes: `gpus_per_node` per node, all alike."""
    nodes: int = 1
    gpus_per_node: int = 1
    intra: Link | None = None     # between GPUs of a node (None with one GPU per node)
    inter: Link | None = None     # between nodes (None on one node), per port
    ports_per_node: int = 1       # inter-node ports of a node, shared by its GPUs


    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def to_dict(self) -> dict:
        link = (lambda k: None if k is None else {"name": k.name, "gbps": k.gbps, "latency_s": k.latency_s})
        return {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "intra": link(self.intra), "inter": link(self.inter), "ports_per_node": self.ports_per_node}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Cluster":
        if d is None:
            return SINGLE
        link = (lambda k: None if k is None else Link(**k))
        return cls(nodes=d["nodes"], gpus_per_node=d["gpus_per_node"], intra=link(d["intra"]),
                   inter=link(d["inter"]), ports_per_node=d.get("ports_per_node", 1))


SINGLE = Cluster()


def make_cluster(gpu: GPU, *, gpus: int = 1, nodes: int = 1, interconnect_name: str | None = None,
                 interconnect_gbps: float | None = None, ports_per_node: int | None = None) -> Cluster:
    """A cluster from the command line's --gpus (in all), --nodes and interconnect flags. Ports per node
    default to one per GPU for NVLink (datacenter) machines and one for PCIe boxes (hardware.md)."""
    for flag, v in (("--gpus", gpus), ("--nodes", nodes), ("--ports-per-node", ports_per_node or 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{flag} must be a positive whole number, not {v!r}.")
    if gpus % nodes:
        raise UserError(f"--gpus {gpus} does not divide evenly over --nodes {nodes}; give the GPUs in all, "
                        "the same number on every node.")
    per = gpus // nodes
    ports = ports_per_node or (per if gpu.nvlink_gbps > 0 else 1)
    return Cluster(nodes=nodes, gpus_per_node=per, intra=intra_link(gpu) if per > 1 else None,
                   inter=interconnect(interconnect_name, interconnect_gbps) if nodes > 1 else None,
                   ports_per_node=ports)


def wire_bytes(kind: str, nbytes: int, world: int) -> int:
    """Bytes one rank sends (and receives) for a ring collective over `nbytes` (the full buffer's size)."""
    if world <= 1 or nbytes <= 0:
        return 0
    if kind == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if kind in ("reduce_scatter", "all_gather"):
        return (world - 1) * nbytes // world
    raise ValueError(f"unknown collective {kind}")


def collective_seconds(kind: str, nbytes: int, cluster: Cluster, *, slow_link: float = 1.0) -> float:
    """Time of one ring collective over `nbytes` on `cluster` (hierarchical over nodes: the slower level
    bounds it). `slow_link` scales every link's bandwidth down (a what-if: 2.0 = links at half speed)."""
    n = cluster.world
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    levels = []
    if cluster.gpus_per_node > 1:
        g = cluster.gpus_per_node
        levels.append((cluster.intra, wire_bytes(kind, nbytes, g)))
    if cluster.nodes > 1:
        # Across nodes a node acts as one ring member over the whole buffer; its ports share the bytes.
        levels.append((cluster.inter, wire_bytes(kind, nbytes, cluster.nodes) / cluster.ports_per_node))
    t = max(w / (link.gbps * 1e9) * slow_link for link, w in levels)
    return t + steps * max(link.latency_s for link, _ in levels)


def rank_hardware(hw: Hardware, cluster: Cluster) -> Hardware:
    """What one rank gets of its node's shared resources (`hw` describes one node: its GPU model and its host).

    The ranks of a node divide its NVMe bandwidth, its CPU optimizer throughput and its host memory bandwidth:
    each rank's host<->device copies run at most at mem_gbps / ranks (eight cards at 25 GB/s each ask 200 GB/s
    of the host's memory system), and NVMe reads, writes and CPU AdamW steps at 1/ranks of the node's figure.
    Capacities stay the node's: planner.memory counts per node what each rank holds and what the ranks share
    (frozen weights in host memory, once). The planner prices a cluster plan on this view; with one GPU a node
    it is `hw` itself."""
    g = cluster.gpus_per_node
    if g <= 1:
        return hw
    share = hw.host.mem_gbps / g / max(hw.eff.link, 1e-9)   # Hardware.link multiplies by eff.link
    gpu = replace(hw.gpu, h2d_gbps=min(hw.gpu.h2d_gbps, share), d2h_gbps=min(hw.gpu.d2h_gbps, share))
    host = replace(hw.host, nvme_read_gbps=hw.host.nvme_read_gbps / g, nvme_write_gbps=hw.host.nvme_write_gbps / g,
                   cpu_adam_params_per_s=hw.host.cpu_adam_params_per_s / g)
    return replace(hw, gpu=gpu, host=host)
