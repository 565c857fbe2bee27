"""The copy engine, the tiered store and the optimizer, piece by piece (CPU standing in for the device)."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from planner.llama import LlamaModel, init_weights
from planner.schedule import Op
from runtime import model as rmodel
from runtime.engine import Executor, Streams
from runtime.hostio import NvmeFiles, aligned_empty
from runtime.optim import AdamWConfig, adamw_
from runtime.store import FlatLayout, Target, TieredStore, bind
from runtime.trace import Tracer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers, in any import mode
from test_equivalence import TINY  # noqa: E402

CPU = Target.detect(force_cpu=True)


class Recorder:
    """A handler that sleeps for each op and records (name, thread, start, end)."""

    def __init__(self, seconds: dict[str, float], fail: str | None = None):
        self.seconds, self.fail = seconds, fail
        self.spans: dict[str, tuple[str, float, float]] = {}
        self.booked: list[str] = []
        self.aborted = False

    def execute(self, op, gpu) -> None:
        start = time.perf_counter()
        if op.name == self.fail:
            raise OSError(f"{op.name} failed")
        time.sleep(self.seconds.get(op.name, 0.0))
        self.spans[op.name] = (threading.current_thread().name, start, time.perf_counter())

    def book(self, op) -> None:
        self.booked.append(op.name)

    def moved_bytes(self, op) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True


def _ops(*specs, layer: int = 0) -> list[Op]:
    return [Op(id=k, name=n, kind=kind, stream=s, layer=layer, micro_batch=0, deps=deps)
            for k, (n, kind, s, deps) in enumerate(specs)]


def test_streams_overlap_and_deps_hold():
    ops = _ops(("load A", "load_weights", "h2d", ()),
               ("load B", "load_weights", "h2d", ()),        # issued before fwd A: prefetched while it computes
               ("fwd A", "forward", "compute", (0,)),
               ("read C", "read_weights", "nvme_read", ()),
               ("fwd B", "forward", "compute", (1, 2)),
               ("adam", "optimizer_step", "cpu_opt", (4,)))
    rec = Recorder({"load A": 0.05, "fwd A": 0.15, "load B": 0.1, "read C": 0.1, "fwd B": 0.05, "adam": 0.02})
    streams = Streams(CPU)
    try:
        t0 = time.perf_counter()
        Executor(streams, Tracer(enabled=False)).run(ops, rec)
        wall = time.perf_counter() - t0
    finally:
        streams.close()
    s = rec.spans
    assert s["fwd A"][1] >= s["load A"][2] and s["fwd B"][1] >= max(s["fwd A"][2], s["load B"][2])
    assert s["adam"][1] >= s["fwd B"][2]
    assert s["load B"][1] < s["fwd A"][2]          # the copy ran while the compute did
    assert s["fwd A"][0] == threading.main_thread().name and s["load B"][0].startswith("blockfit-h2d")
    assert s["read C"][0].startswith("blockfit-nvme_read") and s["adam"][0].startswith("blockfit-cpu_opt")
    assert wall < 0.05 + 0.15 + 0.05 + 0.02 + 0.08  # serial would be 0.47 s
    assert rec.booked == [op.name for op in ops]     # booked in issue order


def test_a_failing_copy_fails_the_step_without_hanging():
    ops = _ops(("load A", "load_weights", "h2d", ()), ("fwd A", "forward", "compute", (0,)),
               ("evict A", "evict", "compute", (1,)))
    rec = Recorder({}, fail="load A")
    streams = Streams(CPU)
    try:
        with pytest.raises(OSError, match="load A failed"):
            Executor(streams, Tracer(enabled=False)).run(ops, rec)
    finally:
        streams.close()
    assert "fwd A" not in rec.spans and rec.aborted


def test_store_tiers_round_trip_and_nvme_bypasses_nothing(tmp_path):
    layer = torch.nn.Linear(8, 3)
    lay = FlatLayout.of(layer)
    assert lay.numel == 27 and lay.names == ("weight", "bias")
    flats = [torch.randn(27) for _ in range(3)]
    store = TieredStore(target=CPU, layouts=[lay] * 3, tiers=["gpu", "cpu", "nvme"], nvme_dir=str(tmp_path),
                        window_layers=2)
    try:
        for i, f in enumerate(flats):
            store.put(i, f)
        for i, f in enumerate(flats):
            assert torch.equal(store.get(i), f)
        (root,) = os.listdir(tmp_path)
        assert os.listdir(tmp_path / root) == ["weights-L2.bin"]
        assert os.path.getsize(tmp_path / root / "weights-L2.bin") == 27 * 4
        staged = store.read_weights(2)
        assert torch.equal(staged[:27], flats[2])
        store.release_staging(staged)
        assert store.resident_bytes() == 27 * 4
        bind(layer, lay, store.resident(0), empty=store.empty)
        assert torch.equal(layer.weight.detach().flatten(), flats[0][:24])
        assert layer.weight.untyped_storage().data_ptr() == store.resident(0).untyped_storage().data_ptr()
        bind(layer, lay, None, empty=store.empty)
        assert layer.weight.numel() == 0
    finally:
        store.close()
    assert os.listdir(tmp_path) == []  # the NVMe scratch directory goes with the store


def test_nvme_reads_reach_the_drive(tmp_path, monkeypatch):
    """Aligned buffers are read with O_DIRECT in several requests; others after dropping the page cache."""
    advice, flags = [], []
    fadvise, open_ = os.posix_fadvise, os.open
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: (advice.append(how), fadvise(fd, off, n, how)))
    monkeypatch.setattr(os, "open", lambda path, fl, *a: (flags.append(fl), open_(path, fl, *a))[1])
    files = NvmeFiles(str(tmp_path))
    try:
        t = torch.arange(1_000_003, dtype=torch.float32)   # not a whole number of 4 KiB blocks
        files.write("x", t)
        assert advice == [os.POSIX_FADV_DONTNEED]          # written, made durable, dropped from the cache
        assert torch.equal(files.read("x", aligned_empty(t.numel(), torch.float32)), t)
        assert flags[-1] & os.O_DIRECT
        unaligned = torch.empty(t.numel() + 1)[1:]
        assert torch.equal(files.read("x", unaligned), t)
        assert not flags[-1] & os.O_DIRECT and advice[-1] == os.POSIX_FADV_DONTNEED
    finally:
        files.close()


def test_flat_adamw_equals_torch_adamw_bitwise():
    g = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (17,), (5, 4, 3)]
    params = [torch.randn(s, generator=g) for s in shapes]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    cfg = AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    lay = FlatLayout(names=("a", "b", "c"), shapes=tuple(shapes), offsets=(0, 561, 578), numel=638)
    flat = lay.flatten(params, torch.empty(638))
    m, v = torch.zeros(638), torch.zeros(638)
    for step in range(1, 6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        lr = 1e-2 / step
        for p, gr in zip(ref, grads):
            p.grad = gr.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        adamw_(lay.views(flat), grads, lay.views(m), lay.views(v), step=step, lr=lr, cfg=cfg)
        assert all(torch.equal(a, b.detach()) for a, b in zip(lay.views(flat), ref))


def test_random_init_equals_init_weights_over_the_whole_model(tmp_path):
    layers = rmodel.meta_layers(TINY)
    layouts = rmodel.layouts_of(layers)
    store = TieredStore(target=CPU, layouts=layouts, tiers=["gpu", "cpu", "nvme", "gpu", "cpu", "nvme"],
                        nvme_dir=str(tmp_path), window_layers=2)
    try:
        rmodel.init_random(TINY, layouts, store, seed=7)
        got = rmodel.state_dict(TINY, layouts, store)
    finally:
        store.close()
    ref = LlamaModel(TINY)
    g = torch.Generator().manual_seed(7)
    for layer in ref.layers:
        init_weights(layer, std=rmodel.INIT_STD, generator=g)
    from runtime.hf import hf_state_from_layers
    want = hf_state_from_layers(ref.layers, TINY)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
