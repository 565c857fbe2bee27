"""planner/profile.py against independent measurements: the shipped profiles against a fresh one, whole-model
FLOPs against FlopCounterMode, saved activations against what a real model on CPU saves, and the fit itself.

The comparisons use (micro-batch, sequence) shapes that are not fit points, so they test the fitted form too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import networkx as nx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from planner.llama import build_model, init_weights
from planner.models import CATALOG
from planner.profile import (
    _POINTS,
    PROFILE_VERSION,
    SHIPPED_DIR,
    Envelope,
    LayerProfile,
    ModelProfile,
    Poly,
    _register_cpu_flash_flops,
    profile_model,
)

OFF_GRID = ((3, 96), (2, 200))
assert not set(OFF_GRID) & set(_POINTS)


@pytest.fixture(scope="module")
def fresh():
    """Measured now, not read from the shipped files or the user's cache."""
    return {name: profile_model(cfg, cache=False) for name, cfg in CATALOG.items()}


# Shapes the planner prices (micro-batch, sequence): where a difference between two profiles would change a plan.
TRAINING_SHAPES = ((1, 2048), (4, 1024), (8, 4096))
# The fitted quantities are counts (FLOPs, bytes) of up to ~1e15 at these shapes. An exact fit of the same
# measurement gives the same float on every CPU; what a tolerance must absorb is float64 evaluation of the
# polynomial (relative ~1e-15). A real change of the measurement (an extra matmul, a saved tensor more or less, a
# different attention count) moves a value by a b*s-sized term, 1e-6 of it or more; the old numpy fit's residues
# (-1e-06 for a true 0) are far below a byte. 1e-9 relative (with half a unit absolute, for true zeros) separates
# the two by three orders of magnitude either way.
REL_TOL = 1e-9


def _assert_same_profile(fresh: ModelProfile, shipped: ModelProfile, name: str) -> None:
    """Every field of every layer equal: integers exactly, fitted quantities by their values at TRAINING_SHAPES."""
    assert (shipped.version, shipped.fingerprint, shipped.dtype) == (fresh.version, fresh.fingerprint, fresh.dtype)
    assert len(shipped.layers) == len(fresh.layers), name
    for a, b in zip(fresh.layers, shipped.layers):
        for f in dataclasses.fields(LayerProfile):
            x, y = getattr(a, f.name), getattr(b, f.name)
            where = f"{name}.layers[{a.index}].{f.name}"
            if isinstance(x, (Poly, Envelope)):
                for bs in TRAINING_SHAPES:
                    assert math.isclose(x.at(*bs), y.at(*bs), rel_tol=REL_TOL, abs_tol=0.5), \
                        f"{where} at {bs}: fresh {x.at(*bs)}, shipped {y.at(*bs)}"
            else:
                assert x == y, f"{where}: fresh {x!r}, shipped {y!r}"


@pytest.mark.parametrize("name", list(CATALOG))
def test_shipped_profile_equals_a_fresh_measurement(fresh, name):
    prof = fresh[name]
    path = os.path.join(SHIPPED_DIR, f"profile-v{PROFILE_VERSION}-{prof.fingerprint}-{prof.dtype}.json")
    assert os.path.isfile(path), f"no shipped profile for {name}: run python -m planner.profile"
    with open(path, encoding="utf-8") as f:
        shipped = ModelProfile.from_dict(json.load(f))
    _assert_same_profile(prof, shipped, name)
    # and what profile_model serves from the shipped file is that measurement
    served = profile_model(CATALOG[name])
    assert served.model is CATALOG[name]
    assert shipped.layers == served.layers


def _full_step_flops(model, b: int, s: int, *, frozen: bool) -> int:
    for p in model.parameters():
        p.requires_grad_(not frozen)
        p.grad = None
    tokens = torch.zeros(b, s, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        x = model.layers[0](tokens)
        if frozen:
            x = x.detach().requires_grad_()  # the chain rule runs down to the first decoder layer
        for layer in model.layers[1:-1]:
            x = layer(x)
        model.layers[-1](x, tokens).backward()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def meta_models():
    _register_cpu_flash_flops()  # so FlopCounterMode counts the CPU flash attention op, as the profile does
    with torch.device("meta"):
        return {name: build_model(CATALOG[name]).to(torch.bfloat16) for name in ("tiny", "1b")}


@pytest.mark.parametrize("name", ["tiny", "1b"])
@pytest.mark.parametrize("b, s", OFF_GRID)
def test_whole_step_flops_match_flop_counter(fresh, meta_models, name, b, s):
    prof, model = fresh[name], meta_models[name]
    assert prof.layers[0].fwd_flops.at(b, s) == prof.layers[0].bwd_flops.at(b, s) == 0  # a lookup, no matmul
    counted = _full_step_flops(model, b, s, frozen=False)
    predicted = sum(lp.fwd_flops.at(b, s) + lp.bwd_flops.at(b, s) for lp in prof.layers)
    assert predicted == pytest.approx(counted, rel=0.02)
    counted_frozen = _full_step_flops(model, b, s, frozen=True)
    predicted_frozen = sum(lp.fwd_flops.at(b, s) + lp.bwd_input_flops.at(b, s) for lp in prof.layers)
    assert predicted_frozen == pytest.approx(counted_frozen, rel=0.02)
    # frozen weights skip the weight gradients: about a third less work, never more
    assert counted_frozen < 0.8 * counted


@pytest.fixture(scope="module")
def one_thread():
    # Two cores shared with other jobs: torch's two threads contend and a tiny matmul takes 100x longer.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def real_tiny(one_thread):
    cfg = CATALOG["tiny"]
    model = build_model(cfg)  # on CPU, float32
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:
        init_weights(layer, generator=g)
    return model


def _real_saved_bytes(model, b: int, s: int, *, frozen: bool) -> int:
    """Bytes of the unique storages autograd saves for one forward of the whole model, parameters excluded."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(b * 1000 + s)
    tokens = torch.randint(0, cfg.vocab, (b, s), generator=g)
    labels = torch.randint(0, cfg.vocab, (b, s), generator=g)
    for p in model.parameters():
        p.requires_grad_(not frozen)
        p.grad = None
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = model.layers[0](tokens)
        if frozen:
            x = x.detach().requires_grad_()
        for layer in model.layers[1:-1]:
            x = layer(x)
        loss = model.layers[-1](x, labels)
    loss.backward()  # the graph is real: it runs
    assert math.isfinite(loss.item())
    return sum(saved.values())


@pytest.fixture(scope="module")
def tiny_fp32():
    return profile_model(CATALOG["tiny"], dtype="float32", cache=False)


@pytest.mark.parametrize("b, s", OFF_GRID)
def test_saved_activations_match_a_real_cpu_model(real_tiny, tiny_fp32, b, s):
    real = _real_saved_bytes(real_tiny, b, s, frozen=False)
    predicted = sum(lp.saved_bytes.at(b, s) for lp in tiny_fp32.layers)
    assert predicted == pytest.approx(real, rel=0.10)
    real_frozen = _real_saved_bytes(real_tiny, b, s, frozen=True)
    predicted_frozen = sum(lp.saved_frozen_bytes.at(b, s) for lp in tiny_fp32.layers)
    assert predicted_frozen == pytest.approx(real_frozen, rel=0.10)
    # a frozen linear keeps no copy of its input: frozen layers really save less
    assert real_frozen < 0.9 * real


def test_bf16_profile_saves_half_of_fp32_activations(fresh, tiny_fp32):
    # everything saved in a decoder layer is in the model's dtype except RMSNorm's fp32 internals and the
    # int64 tokens: bf16 saves strictly less than fp32, and more than a third of it
    b, s = OFF_GRID[0]
    bf16 = fresh["tiny"].layers[1].saved_bytes.at(b, s)
    fp32 = tiny_fp32.layers[1].saved_bytes.at(b, s)
    assert fp32 / 3 < bf16 < fp32


def test_poly_fit_recovers_a_known_polynomial():
    c = (1234.0, 56.5, -7.0, 89.25, 0.125)
    truth = Poly(c=c)
    values = [c[0] + c[1] * s + b * (c[2] + c[3] * s + c[4] * s * s) for b, s in _POINTS]
    fitted = Poly.fit(values)
    assert fitted.c == c
    for b, s in ((3, 96), (7, 1000), (1, 1)):
        assert fitted.at(b, s) == truth.at(b, s)
    # a value can not go negative (bytes, FLOPs): the clamp
    assert Poly(c=(-10.0, 0.0, 0.0, 0.0, 0.0)).at(1, 1) == 0.0


def test_poly_fit_is_exact_for_large_integer_counts():
    """Counts the size of a 70B layer's FLOPs: a float solve leaves residues (a -1e-06 for a true 0, depending on
    the CPU); the exact fit returns the integer coefficients themselves, and is exact wherever it is evaluated."""
    c = (0, 3 * 2**40 + 7, 0, 8192 * 28672 * 6, 64 * 128 * 4)  # integers; c0 and c2 truly 0
    values = [c[0] + c[1] * s + b * (c[2] + c[3] * s + c[4] * s * s) for b, s in _POINTS]  # Python ints: exact
    fitted = Poly.fit(values)
    assert fitted.c == tuple(float(x) for x in c)
    assert fitted.c[0] == 0.0 and fitted.c[2] == 0.0
    for b, s in ((1, 2048), (8, 4096)):
        assert int(fitted.at(b, s)) == c[0] + c[1] * s + b * (c[2] + c[3] * s + c[4] * s * s)
    # a rational solution (not every measurement is a polynomial with integer coefficients) is the exact one,
    # rounded once: sympy's exact solve of the same system is the reference
    import sympy
    values = [1, 0, 7, 0, 0]
    exact = sympy.Matrix([[1, s, b, b * s, b * s * s] for b, s in _POINTS]).LUsolve(sympy.Matrix(values))
    assert any(not x.is_integer for x in exact)
    assert Poly.fit(values).c == tuple(float(x) for x in exact)


def test_graph_is_a_chain_over_all_layers(fresh):
    prof = fresh["1b"]
    g = prof.graph()
    n = prof.n_decoder
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == n + 2 and g.number_of_edges() == n + 1
    assert list(nx.topological_sort(g)) == list(range(n + 2))
    assert all(g.has_edge(i, i + 1) for i in range(n + 1))
    assert [g.nodes[i]["kind"] for i in (0, 1, n, n + 1)] == ["embedding", "decoder", "decoder", "head"]
    assert sum(d["params"] for _, d in g.nodes(data=True)) == prof.total_params
    assert g.edges[0, 1]["bytes"].at(1, 2048) == 2048 * 2048 * 2  # the bf16 activation handed on


def test_head_workspace_covers_the_fp32_logits(fresh):
    head = fresh["8b"].layers[-1]
    assert head.kind == "head"
    assert head.workspace_bytes.at(1, 4096) >= 1 * 4096 * 128256 * 4


@pytest.mark.parametrize("kind", ["decoder", "head"])
@pytest.mark.parametrize("trainable", [True, False])
def test_per_pass_workspace_on_meta_equals_a_real_cpu_layer(kind, trainable):
    """What the profile measures on the meta device (saved bytes, the workspace of each pass) is what the same
    tracker sees on a real CPU layer with real data, at shapes off the fit grid; and the fitted envelopes give
    the measured peaks there (what the runtime's ledger books per op, tests/runtime/test_bcd.py)."""
    from planner.llama import DecoderLayer, Head
    from planner.profile import _measure
    cfg = CATALOG["tiny"]
    cls = {"decoder": DecoderLayer, "head": Head}[kind]
    with torch.device("meta"):
        meta_layer = cls(cfg)
    torch.manual_seed(0)
    cpu_layer = cls(cfg)
    prof = profile_model(cfg, dtype="float32", cache=False).layers[1 if kind == "decoder" else -1]
    fields = {"saved": "saved_bytes" if trainable else "saved_frozen_bytes",
              "fwd_ws": "fwd_workspace_bytes" if trainable else "fwd_frozen_workspace_bytes",
              "bwd_ws": "bwd_workspace_bytes" if trainable else "bwd_frozen_workspace_bytes",
              "nograd_ws": "nograd_workspace_bytes"}
    for b, s in OFF_GRID:
        on_meta = _measure(meta_layer, kind, cfg, b, s, trainable=trainable, dtype=torch.float32)
        on_cpu = _measure(cpu_layer, kind, cfg, b, s, trainable=trainable, dtype=torch.float32, device="cpu")
        assert {k: on_cpu[k] for k in fields} == {k: on_meta[k] for k in fields}  # op by op, every pass
        peaks = {k: max(v) if isinstance(v, list) else v for k, v in on_meta.items() if k in fields}
        assert {k: round(getattr(prof, f).at(b, s)) for k, f in fields.items()} == peaks


@pytest.mark.parametrize("kind", ["decoder", "head"])
def test_shipped_workspace_extrapolates_to_training_shapes(kind):
    """Fitted at sequences up to 128, used at thousands: the shipped 1B profile's workspace of every pass equals a
    measurement at (1, 2048) and (4, 1024). (One polynomial fitted to the peaks gave a third of the trainable
    head's backward there: its peak moves from a weight-sized temporary to a logits-sized one.)"""
    from planner.llama import DecoderLayer, Head
    from planner.profile import _measure
    cfg = CATALOG["1b"]
    with torch.device("meta"):
        layer = {"decoder": DecoderLayer, "head": Head}[kind](cfg).to(torch.bfloat16)
    lp = profile_model(cfg).layers[1 if kind == "decoder" else -1]
    for b, s in ((1, 2048), (4, 1024)):
        for trainable, suffix in ((True, ""), (False, "_frozen")):
            got = _measure(layer, kind, cfg, b, s, trainable=trainable, dtype=torch.bfloat16)
            for key, field in (("fwd_ws", f"fwd{suffix}_workspace_bytes"), ("bwd_ws", f"bwd{suffix}_workspace_bytes"),
                               ("nograd_ws", "nograd_workspace_bytes")):
                assert round(getattr(lp, field).at(b, s)) == max(got[key]), (b, s, trainable, key)
