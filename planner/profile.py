"""Profile a model layer by layer on the meta device: no weights, no RAM, no GPU.

For each layer (embedding, each decoder layer, head + loss) we run the real torch module's forward and backward
on meta tensors and record:
  - parameters and their bf16 bytes;
  - forward FLOPs, backward FLOPs with trainable weights, backward FLOPs with frozen weights (input gradient
    only), all from torch.utils.flop_counter.FlopCounterMode;
  - bytes saved for backward, through saved-tensor hooks (parameters excluded, storages counted once), both
    with trainable and with frozen weights: a frozen linear layer needs no copy of its input;
  - the transient workspace peak: live bytes of every storage the layer's ops create, tracked op by op with a
    dispatch mode (the head's fp32 logits are the usual maximum);
  - bytes that non-matmul ops read and write, for the memory-bound share of the time.

Every quantity depends on micro-batch b and sequence s. Matmul and elementwise work grow with b*s, attention
with b*s^2, RoPE tables with s alone; so we measure at five (b, s) points and fit
    value(b, s) = c0 + c1*s + b*(c2 + c3*s + c4*s^2)
exactly (five terms, five points, solved in rational arithmetic: the same on every CPU). Decoder layers of one
model are identical, so one is measured and its profile stands for all: that is also what lets the ILP treat them
symmetrically.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction

from planner.models import ModelConfig

# (b, s) points of the fit; small on purpose: meta tensors cost per op, not per element.
_POINTS = ((1, 32), (1, 64), (1, 128), (2, 32), (2, 64))
PROFILE_VERSION = 5


@dataclass(frozen=True, kw_only=True)
class Poly:
    """value(b, s) = c0 + c1*s + b*(c2 + c3*s + c4*s^2), fitted exactly to measurements."""
    c: tuple[float, float, float, float, float]

    def at(self, b: int, s: int) -> float:
        c0, c1, c2, c3, c4 = self.c
        return max(0.0, c0 + c1 * s + b * (c2 + c3 * s + c4 * s * s))

    @staticmethod
    def fit(values: list[float]) -> "Poly":
        """The five coefficients through the five measurements, solved in exact rational arithmetic.

        The measurements are counts (FLOPs, bytes: integers) and the basis at the integer fit points is integer, so
        Gauss-Jordan elimination over Fractions gives the exact solution, and each coefficient is then rounded once
        to the nearest float. A floating-point solve leaves residues that depend on the CPU and the BLAS build (a
        -1e-06 where the truth is 0): the same measurements must give the same profile on every machine."""
        basis = [(1, s, b, b * s, b * s * s) for b, s in _POINTS]
        rows = [[Fraction(x) for x in row] + [Fraction(v)] for row, v in zip(basis, values, strict=True)]
        n = len(basis)
        for col in range(n):
            pivot = next(r for r in range(col, n) if rows[r][col] != 0)  # the basis is nonsingular at _POINTS
            rows[col], rows[pivot] = rows[pivot], rows[col]
            for r in range(n):
                if r != col and rows[r][col] != 0:
                    f = rows[r][col] / rows[col][col]
                    rows[r] = [x - f * y for x, y in zip(rows[r], rows[col])]
        return Poly(c=tuple(float(rows[i][n] / rows[i][i]) for i in range(n)))


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """value(b, s) = the largest of several Polys: a transient peak, which is a maximum over the moments of a pass.

    Which moment holds the most bytes changes with the shape (a weight-sized temporary at short sequences, a
    logits-sized one at long ones), so one polynomial fitted to the peaks is wrong off the fit points. Every op of a
    layer's pass runs at every shape, so the bytes alive after the k-th op are a Poly of their own, fitted exactly;
    the peak is their maximum. Polys no larger than another anywhere (coefficient by coefficient: every basis term
    is positive for b, s >= 1) are dropped."""
    polys: tuple[Poly, ...]

    def at(self, b: int, s: int) -> float:
        return max((p.at(b, s) for p in self.polys), default=0.0)

    @staticmethod
    def fit(timelines: list[list[float]]) -> "Envelope":
        """timelines[i][k]: the bytes above the pass's end state after op k, at fit point i."""
        if len({len(t) for t in timelines}) != 1:  # the passes differ in their ops: fit the peaks alone
            return Envelope(polys=(Poly.fit([max(t, default=0.0) for t in timelines]),))
        return Envelope.union([Poly.fit(list(col)) for col in zip(*timelines)])

    @staticmethod
    def union(polys) -> "Envelope":
        keep: list[Poly] = []
        for p in sorted(set(polys), key=lambda q: q.c, reverse=True):
            if not any(all(a >= b for a, b in zip(k.c, p.c)) for k in keep):
                keep.append(p)
        return Envelope(polys=tuple(keep))


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    index: int
    kind: str                   # embedding | decoder | head
    params: int
    param_bytes: int            # its weights where it runs, in the profile's dtype (bf16 for planning; a tied
                                # head's copy of the embedding included); gradients take as much
    fwd_flops: Poly
    bwd_flops: Poly             # weights trainable: input and weight gradients
    bwd_input_flops: Poly       # weights frozen: input gradient only (0 for the embedding)
    saved_bytes: Poly           # saved for backward, weights trainable
    saved_frozen_bytes: Poly    # saved for backward, weights frozen
    workspace_bytes: Envelope   # transient peak above inputs, outputs and saved tensors, the largest of:
    fwd_workspace_bytes: Envelope  # a forward that saves for backward, weights trainable,
    fwd_frozen_workspace_bytes: Envelope  # the same, weights frozen (the input still needs its gradient),
    nograd_workspace_bytes: Envelope  # a forward under no_grad (its intermediates live until it returns),
    bwd_workspace_bytes: Envelope  # a backward, weights trainable (weight gradients are not workspace: the plan
                                   # counts them),
    bwd_frozen_workspace_bytes: Envelope  # a backward, weights frozen
    mem_traffic_bytes: Poly     # bytes read + written by non-matmul ops in forward
    out_bytes: Poly             # the layer's output (the activation handed to the next layer)


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    version: int
    model: ModelConfig
    fingerprint: str
    dtype: str
    layers: tuple[LayerProfile, ...]

    @property
    def n_decoder(self) -> int:
        return self.model.layers

    @property
    def total_params(self) -> int:
        return sum(lp.params for lp in self.layers)

    def graph(self):
        """The layers as a networkx DiGraph (a chain for decoders; the format allows more)."""
        import networkx as nx
        g = nx.DiGraph()
        for lp in self.layers:
            g.add_node(lp.index, kind=lp.kind, params=lp.params)
        for a, b in zip(self.layers, self.layers[1:]):
            g.add_edge(a.index, b.index, bytes=a.out_bytes)
        return g

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelProfile":
        def value(v):
            if isinstance(v, dict) and "polys" in v:
                return Envelope(polys=tuple(Poly(c=tuple(p["c"])) for p in v["polys"]))
            return Poly(c=tuple(v["c"])) if isinstance(v, dict) else v

        def lp(x):
            return LayerProfile(**{k: value(v) for k, v in x.items()})
        return cls(version=d["version"], model=ModelConfig.from_dict(d["model"]), fingerprint=d["fingerprint"],
                   dtype=d["dtype"], layers=tuple(lp(x) for x in d["layers"]))


def _register_cpu_flash_flops() -> None:
    """FlopCounterMode knows the CUDA flash kernels but not the CPU one the profile runs on meta.
    Its FLOPs are those of attention: 2*b*h*s*s*d for Q@K^T and again for P@V forward, and twice that
    (four matmuls of the same size, plus the recomputed scores) backward, as the CUDA formulas count."""
    import torch
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    if getattr(_register_cpu_flash_flops, "done", False):
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _register_cpu_flash_flops.done = True


_MATMUL_OPS = None


def live_bytes_tracker(*, profiling: bool = True):
    """A dispatch mode that tracks the storages ops create (bytes alive now, their peak) and non-matmul traffic.

    Outputs that share storage with an input (views, in-place and out= ops, set_ onto an existing storage) create
    nothing: only new storages count. Liveness is the storage's, not a tensor's (a storage outlives the tensor
    that made it when a view or a saved-tensor hook holds it): each storage is held by a weak reference and
    checked before every op and when `settle()` is called, so the peak seen at an allocation is exact. The
    runtime uses the same tracker to measure kernel temporaries on the CPU, so the profile's workspace and the
    runtime's ledger count alike (it passes profiling=False: the traffic count and the timeline are the profile's
    alone)."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (weak ref, bytes)
            self.live = 0
            self.peak = 0
            self.traffic = 0
            self.timeline: list[int] = []  # bytes alive after each op (the profile's Envelope fits them)

        def settle(self) -> int:
            """Forget the storages that have been freed; the bytes alive now."""
            for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
                self.live -= self.refs.pop(key)[1]
            return self.live

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat_in = tree_flatten((args, kwargs))[0]
            ins = [t for t in flat_in if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if profiling and func.overloadpacket not in flop_registry:
                if not func._schema.name.startswith(("aten::view", "aten::_unsafe_view", "aten::t", "aten::transpose",
                                                     "aten::expand", "aten::detach", "aten::alias",
                                                     "aten::permute", "aten::unsqueeze", "aten::slice")):
                    self.traffic += sum(t.numel() * t.element_size() for t in ins + outs)
            existing = {t.untyped_storage()._cdata for t in ins}
            existing |= {s._cdata for s in flat_in if isinstance(s, torch.UntypedStorage)}
            self.settle()
            for t in outs:
                storage = t.untyped_storage()
                key = storage._cdata
                if key in existing or key in self.refs:
                    continue  # a view of, or a write into, something that existed before
                self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            if profiling:
                self.timeline.append(self.live)
            return out

        def above_end(self) -> list[int]:
            """The timeline less the bytes alive now (the pass's end state): the pass's temporaries, op by op."""
            end = self.settle()
            return [x - end for x in self.timeline] or [0]

    return Tracker()


def _measure(layer, kind: str, cfg: ModelConfig, b: int, s: int, *, trainable: bool, dtype, device="meta",
             nograd: bool = True) -> dict:
    """One layer's FLOPs, saved bytes, per-pass workspace and traffic at (b, s), on `device` (the layer's).
    `nograd=False` skips the no_grad forward (whether the weights are trainable makes no difference to it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for p in layer.parameters():
        p.requires_grad_(trainable)
        p.grad = None  # a gradient left from the last point would make this one's accumulate a temporary
    param_keys = {p.untyped_storage()._cdata for p in layer.parameters()}
    if kind == "embedding":
        x = torch.zeros(b, s, dtype=torch.long, device=device)
    else:
        x = torch.randn(b, s, cfg.hidden, device=device).to(dtype).requires_grad_(True)
    labels = torch.zeros(b, s, dtype=torch.long, device=device)
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in param_keys:
            saved[key] = t.untyped_storage().nbytes()
        return t

    tracker = live_bytes_tracker()
    flops = FlopCounterMode(display=False)
    with flops, tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x, labels) if kind == "head" else layer(x)
        fwd_flops = flops.get_total_flops()
        fwd_traffic = tracker.traffic
        out_bytes = y.numel() * y.element_size()
        fwd_ws = tracker.above_end()  # transient above what stays (output + saved)
        has_graph = y.requires_grad
        grad = (torch.ones_like(y) if kind != "head" else None) if has_graph else None
    # Backward with a tracker of its own, as the runtime measures an op: what it creates and frees again.
    bwd_tracker = live_bytes_tracker()
    bwd_flops = FlopCounterMode(display=False)
    with bwd_flops, bwd_tracker:
        if has_graph:
            y.backward(grad)
    bwd_ws = bwd_tracker.above_end()
    # A forward under no_grad (layers below the block) keeps no saved tensors, but its intermediates live until
    # the layer returns: they are that pass's workspace.
    nograd_ws = None
    if nograd:
        tracker = live_bytes_tracker()
        with tracker, torch.no_grad():
            y = layer(x, labels) if kind == "head" else layer(x)
            nograd_ws = tracker.above_end()
    return dict(fwd_flops=fwd_flops, bwd_flops=bwd_flops.get_total_flops(),
                saved=sum(saved.values()) if has_graph else 0, fwd_ws=fwd_ws, bwd_ws=bwd_ws,
                nograd_ws=nograd_ws, traffic=fwd_traffic,
                out=0 if kind == "head" else out_bytes)


def _profile_layer(index: int, kind: str, cfg: ModelConfig, dtype) -> LayerProfile:
    import torch

    from planner.llama import DecoderLayer, Embedding, Head
    with torch.device("meta"):
        layer = {"embedding": Embedding, "decoder": DecoderLayer, "head": Head}[kind](cfg).to(dtype)
    held = params = sum(p.numel() for p in layer.parameters())
    if kind == "head" and cfg.tie_embeddings:
        params -= cfg.vocab * cfg.hidden  # shares the embedding's matrix: one parameter of the model, but the
        # head holds a copy where it runs (the runtime streams the two layers independently)
    train = [_measure(layer, kind, cfg, b, s, trainable=True, dtype=dtype) for b, s in _POINTS]
    frozen = [_measure(layer, kind, cfg, b, s, trainable=False, dtype=dtype, nograd=False) for b, s in _POINTS]

    def fit(rows, key):
        return Poly.fit([r[key] for r in rows])

    def ws(rows, key):
        return Envelope.fit([r[key] for r in rows])
    fwd, fwd_frozen, bwd = ws(train, "fwd_ws"), ws(frozen, "fwd_ws"), ws(train, "bwd_ws")
    bwd_frozen = ws(frozen, "bwd_ws")
    nograd = ws(train, "nograd_ws")
    return LayerProfile(
        index=index, kind=kind, params=params, param_bytes=held * dtype.itemsize, fwd_flops=fit(train, "fwd_flops"),
        bwd_flops=fit(train, "bwd_flops"), bwd_input_flops=fit(frozen, "bwd_flops"), saved_bytes=fit(train, "saved"),
        saved_frozen_bytes=fit(frozen, "saved"),
        workspace_bytes=Envelope.union(sum((e.polys for e in (fwd, fwd_frozen, bwd, bwd_frozen, nograd)), ())),
        fwd_workspace_bytes=fwd, fwd_frozen_workspace_bytes=fwd_frozen, nograd_workspace_bytes=nograd,
        bwd_workspace_bytes=bwd, bwd_frozen_workspace_bytes=bwd_frozen,
        mem_traffic_bytes=fit(train, "traffic"), out_bytes=fit(train, "out"))


SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "catalog", "profiles")


def _cache_path(fp: str) -> str:
    root = os.environ.get("BLOCKFIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blockfit")
    return os.path.join(root, f"profile-v{PROFILE_VERSION}-{fp}.json")


def _shipped_path(fp: str) -> str:
    """Profiles of the catalog models, measured by `python -m planner.profile` and shipped with the package so
    that planning a catalog model needs no torch import (tests/planner/test_profile.py re-measures them)."""
    return os.path.join(SHIPPED_DIR, f"profile-v{PROFILE_VERSION}-{fp}.json")


def profile_model(cfg: ModelConfig, *, dtype: str = "bfloat16", cache: bool = True) -> ModelProfile:
    """Measure (or read from the cache) the per-layer profile of `cfg`. Decoder layers share one measurement."""
    fp = cfg.fingerprint()
    path = _cache_path(f"{fp}-{dtype}")
    for cached in (_shipped_path(f"{fp}-{dtype}"), path):
        if cache and os.path.isfile(cached):
            try:
                with open(cached, encoding="utf-8") as f:
                    prof = ModelProfile.from_dict(json.load(f))
                return dataclasses.replace(prof, model=cfg)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a stale or damaged cache entry is measured again
    import torch
    _register_cpu_flash_flops()
    tdtype = getattr(torch, dtype)
    emb = _profile_layer(0, "embedding", cfg, tdtype)
    dec = _profile_layer(1, "decoder", cfg, tdtype)
    head = _profile_layer(cfg.layers + 1, "head", cfg, tdtype)
    layers = (emb,) + tuple(dataclasses.replace(dec, index=i) for i in range(1, cfg.layers + 1)) + (head,)
    prof = ModelProfile(version=PROFILE_VERSION, model=cfg, fingerprint=fp, dtype=dtype, layers=layers)
    if cache:
        _write_cache(path, prof)
    return prof


def _write_cache(path: str, prof: ModelProfile) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(prof.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation only


if __name__ == "__main__":
    # Measure the catalog models and write the shipped profiles: python -m planner.profile
    from planner.models import CATALOG
    os.makedirs(SHIPPED_DIR, exist_ok=True)
    for _cfg in CATALOG.values():
        _prof = profile_model(_cfg, cache=False)
        _write_cache(_shipped_path(f"{_prof.fingerprint}-{_prof.dtype}"), _prof)
        print(_cfg.name, _prof.total_params)
