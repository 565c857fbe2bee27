"""One command on one GPU: does the runtime run a 7B-wide model as the plan and the simulator say?

    python benchmarks/gpu_check.py                          # one H100/H200 capped at 24 GiB: under 8 minutes
    python benchmarks/gpu_check.py --dry-run                # no CUDA: a tiny width on the CPU, same steps and table
    python benchmarks/gpu_check.py --out check.json --nvme-dir /mnt/nvme/tmp --cap-gib 24

What it does, in order:
  1. `pytest tests/gpu` (the runtime on CUDA: bf16 against the fp32 CPU run, the device ledger within the plan,
     copies overlapping compute). Those tests plan with the ILP, so they need ortools; without it they are
     skipped with a message saying how to install it, and the rest goes on (it needs no ILP);
  2. calibrates this machine with the runtime's own primitives (runtime/calibrate.py: its registered host buffers
     and copy path, its NVMe reader, its AdamW), compute on the same width at half the sequence, so the
     prediction is not fitted to the shape it predicts;
  3. trains a model of Llama-2-7B's layer shapes (hidden 4096, ffn 11008, 32 heads, vocabulary 32000) with
     --layers decoder layers in two blocks, under three hand-placed plans: `resident` (everything on the GPU),
     `streamed` (decoder weights in pinned host memory, streamed through a two-layer window), `nvme_state` (the
     optimizer state of the active block in NVMe files, AdamW on the CPU). The plans are predicted with the
     planner's own predict() and capped at --cap-gib by the runtime (runtime/device.py); no ILP is solved;
  4. writes one JSON (--out) and prints a table, per plan and phase: the median step time (each phase's first
     step left out) against the simulator's prediction with the calibrated profile; torch.cuda.
     max_memory_allocated of the phase and the runtime's device ledger against the plan's peak; the achieved
     H2D GB/s of the runtime's weight loads (bytes over busy seconds on the h2d stream) against a plain pinned
     copy (pin_memory, calibrated); the overlap ratio (busy seconds of all streams over wall seconds) measured
     and simulated.
--dry-run does all of it except CUDA: the CPU stands in for the device (fp32 weights; peaks compared at fp32,
no max_memory_allocated), at hidden 256, sequence 128, in well under a minute. It never runs in CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The CPU stand-in: OpenMP teams of the runtime's worker threads spin-wait after each op and take the cores from
# the compute thread (the resident plan ran 10x slower on 2 busy cores); passive waiting gives them back. Set
# before torch loads, as benchmarks/validate_sim.py does.
if "--dry-run" in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from planner.hardware import GIB, with_overrides  # noqa: E402
from planner.memory import STATE_BYTES  # noqa: E402
from planner.models import load_model_config  # noqa: E402
from planner.plan import SCHEMA_VERSION, Block, Placement, Plan, Shape, SolverReport, validate, write_atomic  # noqa: E402
from planner.planning import predict  # noqa: E402
from planner.profile import profile_model  # noqa: E402
from planner.schedule import build_schedule  # noqa: E402
from runtime.calibrate import calibrate, write_profile  # noqa: E402
from runtime.data import TokenData  # noqa: E402
from runtime.trainer import TrainConfig, Trainer, position  # noqa: E402
from simulator.engine import simulate  # noqa: E402

SEVEN_B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
TINY = {**SEVEN_B, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 1024}
PLANS = ("resident", "streamed", "nvme_state")


def run_gpu_tests(skip: bool) -> dict:
    """`pytest tests/gpu` in a subprocess: its exit code and summary line, or why it did not run."""
    if skip:
        return {"ran": False, "why": "--skip-tests"}
    if importlib.util.find_spec("ortools") is None:
        why = ("ortools is not installed, and tests/gpu plan with the ILP: install it (`pip install ortools`; on a "
               "machine without network, `pip install --no-index` the ortools wheel with its dependencies' wheels "
               "copied there) and run `pytest tests/gpu`; the training checks below need no ILP and go on")
        print(f"tests/gpu skipped: {why}.")
        return {"ran": False, "why": why}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else r.stderr.strip()[-300:]
    print(f"pytest tests/gpu: exit {r.returncode}: {summary} ({time.perf_counter() - t0:.0f} s)")
    if r.returncode not in (0, 5):
        print(r.stdout[-3000:])
    return {"ran": True, "exit": r.returncode, "summary": summary}


def make_plans(cfg, prof, hw, *, cap_bytes: int, reserve_bytes: int, seq: int, batch: int, micro_batch: int,
               steps_per_block: int) -> dict[str, Plan]:
    """The three hand-placed plans: two blocks of decoder layers, the embedding and head resident and frozen."""
    n = cfg.layers + 2
    half = cfg.layers // 2
    blocks = (Block(first=1, last=half), Block(first=half + 1, last=cfg.layers))
    decoder = range(1, n - 1)
    layer_bytes = max(prof.layers[i].param_bytes for i in decoder)
    placements = {
        "resident": [Placement(layer=i) for i in range(n)],
        "streamed": [Placement(layer=i, weights="cpu" if i in decoder else "gpu") for i in range(n)],
        "nvme_state": [Placement(layer=i, master="nvme", moments="nvme", grads="cpu") if i in decoder
                       else Placement(layer=i) for i in range(n)]}
    solver = SolverReport(status="HAND-PLACED", objective=0.0, bound=0.0, gap=0.0, solve_seconds=0.0, time_limit_s=0.0)
    out = {}
    for name in PLANS:
        draft = Plan(schema=SCHEMA_VERSION, model=cfg, fingerprint=prof.fingerprint, hardware=hw,
                     budget_bytes=cap_bytes, reserve_bytes=reserve_bytes,
                     shape=Shape(micro_batch=micro_batch, seq_len=seq, grad_accum=batch // micro_batch),
                     method="bcd", blocks=blocks, order="ascending", seed=0, steps_per_block=steps_per_block,
                     switch_state="reset", placements=tuple(placements[name]),
                     prefetch_window_bytes=2 * layer_bytes if name == "streamed" else 0,
                     predicted=None, solver=solver)
        plan = dataclasses.replace(draft, predicted=predict(draft, prof))
        validate(plan)
        out[name] = plan
    return out


def simulated(plan: Plan, hw, prof, scale: float):
    """The simulator's run of `plan`. On CUDA: the plan's (bf16) schedule with the calibrated profile. On the CPU
    stand-in the runtime holds weights, activations and gradients in fp32 while optimizer state is fp32 on both,
    so no one byte scale prices both (nvme_state moves state): the schedule is sized in fp32, on the plan's own
    prefetch window, and priced with the calibration's raw rates (its scaled ones divided back by `scale`)."""
    if scale == 1.0:
        return simulate(plan, hw, profile=prof)
    g, h = hw.gpu, hw.host
    raw = dataclasses.replace(
        hw, gpu=dataclasses.replace(g, h2d_gbps=g.h2d_gbps / scale, d2h_gbps=g.d2h_gbps / scale,
                                    memory_gbps=g.memory_gbps / scale),
        host=dataclasses.replace(h, nvme_read_gbps=h.nvme_read_gbps / scale, nvme_write_gbps=h.nvme_write_gbps / scale))
    window = build_schedule(plan, prof).window_layers
    return simulate(plan, raw, schedule=build_schedule(plan, profile_model(plan.model, dtype="float32"), window=window))


def h2d_gbps(spans) -> float | None:
    """Achieved GB/s of the weight loads on the h2d stream: their bytes over their busy seconds."""
    loads = [s for s in spans if s["stream"] == "h2d" and s["kind"] == "load_weights" and s["step"] >= 1]
    busy = sum(s["end_s"] - s["start_s"] for s in loads)
    return sum(s["bytes"] for s in loads) / busy / 1e9 if busy > 0 else None


def run_plan(name: str, plan: Plan, hw, prof, *, data_path: str, nvme_dir: str, cuda: bool, work: str,
             scale: float) -> dict:
    """Train plan steps_per_block steps per block; measured and predicted figures per phase."""
    steps = plan.steps_per_block * len(plan.blocks)
    data = TokenData.open(data_path, seq_len=plan.shape.seq_len, seed=0)
    tc = TrainConfig(steps=steps, quiet=True, nvme_dir=nvme_dir, force_cpu=not cuda,
                     trace_path=os.path.join(work, f"trace-{name}.json"))
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tr = Trainer(plan, data, tc)
    mma: dict[int, int] = {}
    try:
        for s in range(steps):
            block = position(plan, s)["block"]
            if cuda and position(plan, s)["step_in_block"] == 0:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            tr.step()
            if cuda:
                mma[block] = max(mma.get(block, 0), torch.cuda.max_memory_allocated())
        summary = tr.summary()
        predicted_peaks = tr.predicted_peaks()
        ledger = dict(tr.phase_peaks)
        achieved = h2d_gbps(tr.tracer.spans)
        history = list(tr.history)
    finally:
        tr.close()
        del tr
    sim = simulated(plan, hw, prof, scale)
    phases = []
    for ph in sim.phases:
        secs = [r["step_seconds"] for r in history if r["block"] == ph.block and r["step_in_block"] > 0] or \
               [r["step_seconds"] for r in history if r["block"] == ph.block]
        med = statistics.median(secs)
        phases.append({"block": ph.block, "measured_s": med, "predicted_s": ph.step_seconds,
                       "error": ph.step_seconds / med - 1, "steps": len(secs),
                       "max_memory_allocated_bytes": mma.get(ph.block), "ledger_peak_bytes": ledger.get(ph.block),
                       "plan_peak_bytes": predicted_peaks[ph.block]})
    return {"plan": name, "phases": phases, "h2d_gbps": achieved, "overlap_measured": summary["overlap_ratio"],
            "overlap_simulated": sim.summary()["overlap_ratio"], "losses": [r["loss"] for r in history],
            "bytes_by_link": summary["bytes_by_link"]}


def _mib(b) -> str:
    return "-" if b is None else f"{b / (1 << 20):.0f}"


def table(results: list[dict], pinned_gbps: float, registered_gbps: float) -> str:
    head = (f"{'plan':<11}{'phase':>6}{'measured s':>11}{'predicted s':>12}{'error':>8}{'max_alloc MiB':>14}"
            f"{'ledger MiB':>11}{'plan MiB':>9}{'H2D GB/s':>9}{'overlap':>8}{'sim':>6}")
    rows = [head, "-" * len(head)]
    for r in results:
        for ph in r["phases"]:
            h2d = "-" if r["h2d_gbps"] is None else f"{r['h2d_gbps']:.2f}"
            rows.append(f"{r['plan']:<11}{ph['block']:>6}{ph['measured_s']:>11.4f}{ph['predicted_s']:>12.4f}"
                        f"{ph['error']:>+8.1%}{_mib(ph['max_memory_allocated_bytes']):>14}"
                        f"{_mib(ph['ledger_peak_bytes']):>11}{_mib(ph['plan_peak_bytes']):>9}{h2d:>9}"
                        f"{r['overlap_measured']:>8.2f}{r['overlap_simulated']:>6.2f}")
    rows.append(f"H2D reference: a plain pinned copy (pin_memory) {pinned_gbps:.2f} GB/s; the runtime's copy path "
                f"from registered memory {registered_gbps:.2f} GB/s (calibration, largest size)")
    worst = max(abs(ph["error"]) for r in results for ph in r["phases"])
    rows.append(f"worst |step-time error| {worst:.1%}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no CUDA: a tiny width on the CPU")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="VRAM budget of the plans (default 24)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers, two blocks (default 4)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; dry run 128)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step, micro-batches of 2 (default 4)")
    ap.add_argument("--steps-per-block", type=int, default=3, help="steps per block (default 3)")
    ap.add_argument("--nvme-dir", help="directory on the NVMe drive (default: a temporary one)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest tests/gpu")
    ap.add_argument("--keep", help="keep the work files (configs, profile, traces) here")
    a = ap.parse_args(argv)
    cuda = not a.dry_run
    if cuda and not torch.cuda.is_available():
        print("gpu_check.py needs CUDA; --dry-run runs everything else on the CPU.")
        return 2
    if a.layers < 2 or a.batch < 2 or a.batch % 2:
        print("--layers must be at least 2 and --batch an even number of sequences.")
        return 2
    seq = a.seq or (2048 if cuda else 128)
    started = time.perf_counter()
    work = a.keep or tempfile.mkdtemp(prefix="blockfit-gpu-check-")
    nvme_dir = a.nvme_dir or os.path.join(work, "nvme")
    os.makedirs(nvme_dir, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "cap_gib": a.cap_gib}
    report["gpu_tests"] = run_gpu_tests(a.skip_tests)

    cfg_path = os.path.join(work, "config.json")
    write_atomic(cfg_path, json.dumps({**(SEVEN_B if cuda else TINY), "num_hidden_layers": a.layers}))
    cfg = load_model_config(cfg_path)
    prof = profile_model(cfg)
    t0 = time.perf_counter()
    print(f"calibrating with the runtime's primitives (compute at sequence {seq // 2}) ...", flush=True)
    measured, meas = calibrate(quick=not cuda, model=cfg_path, seq=max(16, seq // 2), directory=nvme_dir,
                               nvme_file_bytes=prof.layers[1].params * STATE_BYTES)  # nvme_state's files
    write_profile(os.path.join(work, "hw.json"), measured, meas)
    hw = with_overrides(measured, vram_gib=a.cap_gib)
    big = str(max(int(s) for s in meas["links_gbps"]["h2d"]["pinned"]))
    pinned, registered = (meas["links_gbps"]["h2d"][k][big] for k in ("pinned", "registered"))
    report["calibration"] = {"seconds": time.perf_counter() - t0, "hardware": hw.to_dict(), "measurements": meas}
    print(f"calibrated in {time.perf_counter() - t0:.0f} s: {hw.gpu.bf16_tflops:.3g} TFLOPS, h2d "
          f"{hw.gpu.h2d_gbps:.3g} GB/s, NVMe read {hw.host.nvme_read_gbps:.3g} GB/s, CPU AdamW "
          f"{hw.host.cpu_adam_params_per_s / 1e9:.3g} G params/s", flush=True)

    plans = make_plans(cfg, prof, hw, cap_bytes=int(a.cap_gib * GIB), reserve_bytes=int(min(1.5, a.cap_gib / 4) * GIB),
                       seq=seq, batch=a.batch, micro_batch=2, steps_per_block=a.steps_per_block)
    data_path = os.path.join(work, "tokens.bin")
    need = (a.steps_per_block * 2 + 2) * a.batch * (seq + 1) * len(PLANS)
    np.random.default_rng(0).integers(0, cfg.vocab, need).astype(np.uint16).tofile(data_path)
    results = []
    for name, plan in plans.items():
        t0 = time.perf_counter()
        r = run_plan(name, plan, hw, prof, data_path=data_path, nvme_dir=nvme_dir, cuda=cuda, work=work,
                     scale=meas["schedule_bytes_scale"])
        results.append(r)
        print(f"{name}: {len(r['losses'])} steps in {time.perf_counter() - t0:.0f} s, loss {r['losses'][0]:.3f} -> "
              f"{r['losses'][-1]:.3f}", flush=True)
    report["plans"] = results
    report["pinned_copy_gbps"], report["registered_copy_gbps"] = pinned, registered
    report["seconds"] = time.perf_counter() - started
    write_atomic(a.out, json.dumps(report, indent=1))
    print()
    print(table(results, pinned, registered))
    print(f"\n{report['seconds']:.0f} s in all; report in {a.out}" + (f", files in {work}" if a.keep else ""))
    if not a.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
