"""Mutation check: put one deliberate semantic bug at a time into a copy of the repository and run the tests that
should catch it. A mutant that passes its tests "survived": the suite cannot tell that code from the real one.

    python benchmarks/mutants.py               # every mutant, two at a time (about 10-20 minutes on two cores)
    python benchmarks/mutants.py -k ilp,data -j 1   # mutants whose name or file contains "ilp" or "data", serially
    python benchmarks/mutants.py --list

Each mutant is (name, file, exact old snippet, new snippet, tests): the old snippet must occur exactly once in the
file. One that does not is reported as STALE, loudly, and counts against the run: the code moved, re-anchor it.
Mutants are applied to a temporary copy of the working tree (never to the tree itself); its tests run with
`-x -q` under a per-mutant time limit (a mutant that deadlocks is caught by pytest-timeout or by that limit).
Not run in CI: it is a check on the tests, run by hand after changing them or the code they guard.
The tests are first run on the unmutated copy (a failing baseline stops the run: exit 2). Exit status: 0 when
every mutant is caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.pyc", ".ruff_cache")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str = ""         # what the bug is, in words


ILP = "tests/planner/test_ilp.py"
SCHED = "tests/planner/test_schedule.py"
EQUIV = "tests/runtime/test_equivalence.py::test_runtime_equals_plain_pytorch_bcd_bitwise"
CHAOS = "tests/runtime/test_chaos.py::test_the_correct_schedule_under_chaos_equals_the_reference_bitwise"
SIM = "tests/simulator/test_engine.py"
NVME = "tests/simulator/test_nvme.py"
DURABLE = "tests/runtime/test_durability.py"

MUTANTS = [
    # --- planner: memory terms ---------------------------------------------------------------------------------
    Mutant("ilp-head-activations", "planner/ilp.py",
           "fixed = win + w_gpu + head_act + kib(", "fixed = win + w_gpu + kib(", (ILP,),
           "the ILP forgets the head's activation bytes in the phase peak"),
    Mutant("ilp-recompute-checkpoint", "planner/memory.py",
           "RECOMPUTE: sz.out_bytes}[act]", "RECOMPUTE: 0}[act]", (ILP,),
           "a recomputed layer's input checkpoint not counted"),
    Mutant("ilp-inflight-saved", "planner/memory.py",
           "inflight = 2 * max(s.saved_bytes", "inflight = 1 * max(s.saved_bytes", (ILP,),
           "one in-flight saved set instead of two in the transient reserve"),
    Mutant("ilp-device-grads", "planner/memory.py",
           "return params * STATE_BYTES + param_bytes if state == Tier.GPU else 0",
           "return params * STATE_BYTES if state == Tier.GPU else 0",
           (ILP,), "gradients of a device-state block not counted"),
    Mutant("ilp-window", "planner/ilp.py",
           "m.add(win >= 2 * kib(sd.param_bytes) * streamed)", "m.add(win >= 1 * kib(sd.param_bytes) * streamed)",
           (ILP,), "a prefetch window of one streamed layer instead of two"),
    Mutant("plan-recheck-lenient", "planner/planning.py",
           "over = max(p.peak_vram_bytes for p in plan.predicted.phases) - cap\n",
           "over = max(p.peak_vram_bytes for p in plan.predicted.phases) - int(cap * 1.1)\n",
           ("tests/planner/test_tighten.py",), "make_plan's re-check of the replayed peak 10% lenient"),
    Mutant("memory-moment-bytes", "planner/memory.py",
           "MOMENT_BYTES = 8 ", "MOMENT_BYTES = 4 ", (ILP, "tests/runtime/test_bcd.py"),
           "AdamW moments sized as one fp32 tensor instead of two"),
    Mutant("schedule-forward-saves", "planner/schedule.py",
           "alloc_bytes=sz.out_bytes + kept,", "alloc_bytes=sz.out_bytes,",
           ("tests/runtime/test_bcd.py", "tests/runtime/test_trace.py::test_trace_and_summary"),
           "the schedule's forward forgets what it saves for backward"),
    Mutant("replay-d2h-frees-early", "planner/schedule.py",
           'if op.free_bytes and op.stream == "d2h":', 'if op.free_bytes and op.stream == "d2h!":',
           (SCHED,), "the replay frees an offload's source before the copy is waited for"),
    # --- planner: dependencies and order -------------------------------------------------------------------------
    Mutant("schedule-step-ignores-grads", "planner/schedule.py",
           "done = optimizer_ops(b, pl, sizes[i], (prev,) + grads + window)",
           "done = optimizer_ops(b, pl, sizes[i], (prev,) + window)", (SCHED,),
           "the optimizer step does not wait for its gradients' copies to the host"),
    Mutant("schedule-window-off-by-one", "planner/schedule.py",
           "k = len(self.evicts) - self.window\n", "k = len(self.evicts) - self.window - 1\n", (SCHED,),
           "a new load waits for the wrong eviction: the window holds one layer more than planned"),
    Mutant("schedule-fetch-not-after-offload", "planner/schedule.py",
           "ahead = tuple(b.computes[-2:-1]) + (b.offloads[(sz.index, mb)],)", "ahead = tuple(b.computes[-2:-1])",
           (SCHED,), "an activation fetch no longer waits for the offload it reads"),
    Mutant("schedule-no-prefetch-order", "planner/schedule.py",
           'movers = {"read_weights", "load_weights", "fetch_act"}', 'movers = {"read_weights", "fetch_act"}',
           (SCHED,), "weight loads not moved up in issue order: no prefetch"),
    Mutant("schedule-nvme-state-write", "planner/schedule.py",
           'b.emit(name=f"write state {tag}", kind="write_state", stream="nvme_write"',
           'b.emit(name=f"write state {tag}", kind="write_state", stream="nvme_read"', (SCHED, NVME),
           "the optimizer state is written back on the read queue"),
    # --- planner/simulator: bandwidths and time ------------------------------------------------------------------
    Mutant("link-no-latency", "planner/hardware.py",
           "return 0.0 if nbytes <= 0 else self.latency_s + nbytes / (self.gbps * GB)",
           "return 0.0 if nbytes <= 0 else nbytes / (self.gbps * GB)", (NVME,), "per-request latency dropped"),
    Mutant("link-nvme-swapped", "planner/hardware.py",
           '"nvme_read": h.nvme_read_gbps, "nvme_write": h.nvme_write_gbps}',
           '"nvme_read": h.nvme_write_gbps, "nvme_write": h.nvme_read_gbps}', (NVME,),
           "NVMe read and write bandwidths swapped"),
    Mutant("sim-nvme-read-free", "simulator/engine.py",
           "d = memo[key] = op_seconds(op, hw)",
           'd = memo[key] = 0.0 if op.stream == "nvme_read" else op_seconds(op, hw)',
           (NVME,), "the simulator prices nvme_read at 0 s"),
    Mutant("sim-streams-not-fifo", "simulator/engine.py",
           "t, w = free_at[s], last_on[s]", "t, w = 0.0, -1", (SIM,),
           "ops on one stream run side by side instead of in turn"),
    Mutant("sim-ignores-deps", "simulator/engine.py",
           "if finish[d] > t:", "if finish[d] > t + 1e9:", (SIM,), "an op starts before its dependencies finish"),
    Mutant("sim-memory-alloc-late", "simulator/engine.py",
           "events.append((start[i], 1, c, op.alloc_bytes))", "events.append((finish[i], 1, c, op.alloc_bytes))",
           (SIM,), "the simulated clock allocates at an op's end, not its start"),
    Mutant("cycle-without-switch", "planner/plan.py",
           "cycle = sum(steps_per_block * p.step_seconds + p.switch_seconds for p in phases)",
           "cycle = sum(steps_per_block * p.step_seconds for p in phases)",
           (NVME,),
           "block switches cost nothing in the cycle"),
    # --- runtime: optimizer arithmetic, data windows, dependencies, durability -------------------------------------
    Mutant("adamw-bias-correction", "runtime/optim.py",
           "step_size = lr / (1 - cfg.beta1 ** step_f)", "step_size = lr / (1 - cfg.beta1 ** (step_f + 1))",
           ("tests/runtime/test_engine.py::test_flat_adamw_equals_torch_adamw_bitwise",),
           "AdamW's first-moment bias correction one step late"),
    Mutant("adamw-decoupled-decay", "runtime/optim.py",
           "torch._foreach_mul_(params, 1 - lr * cfg.weight_decay)",
           "torch._foreach_mul_(params, 1 - cfg.weight_decay)",
           ("tests/runtime/test_engine.py::test_flat_adamw_equals_torch_adamw_bitwise",),
           "weight decay not scaled by the learning rate"),
    Mutant("adamw-eps-tenfold", "runtime/optim.py",
           "torch._foreach_add_(denom, cfg.eps)", "torch._foreach_add_(denom, cfg.eps * 10)",
           ("tests/runtime/test_engine.py::test_flat_adamw_equals_torch_adamw_bitwise",), "epsilon ten times too big"),
    Mutant("clip-never", "runtime/optim.py",
           "coef = torch.clamp(self.cfg.clip / (total + 1e-6), max=1.0)",
           "coef = torch.clamp(self.cfg.clip / (total + 1e-6), min=1.0)", (EQUIV,),
           "gradient clipping scales up instead of down"),
    Mutant("lr-warmup-off-by-one", "runtime/trainer.py",
           "return cfg.lr * (step + 1) / cfg.warmup", "return cfg.lr * step / cfg.warmup", (EQUIV,),
           "LR warmup off by one (step 0 trains at lr 0)"),
    Mutant("data-window-overlap", "runtime/data.py",
           "starts = np.asarray(picked, dtype=np.int64) * width",
           "starts = np.asarray(picked, dtype=np.int64) * (width - 1)",
           ("tests/runtime/test_data.py",), "windows overlap by one token (stride seq_len, not seq_len + 1)"),
    Mutant("data-labels-not-shifted", "runtime/data.py",
           "return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()",
           "return windows[:, :-1].contiguous(), windows[:, :-1].contiguous()", ("tests/runtime/test_data.py",),
           "labels are the inputs, not the next tokens"),
    Mutant("data-epoch-reshuffle", "runtime/data.py",
           "rng = np.random.default_rng((self.seed, self.epoch))", "rng = np.random.default_rng((self.seed, 0))",
           ("tests/runtime/test_data.py",), "every epoch serves the windows in the same order"),
    Mutant("executor-waits-first-dep-only", "runtime/engine.py",
           "        for d in deps:\n            event = d.result()",
           "        for d in deps[:1]:\n            event = d.result()",
           (CHAOS,), "an op waits for its first dependency only (a stream that skips wait_event)"),
    Mutant("backward-grad-halved", "runtime/activations.py",
           "self.grad_out[(i - 1, mb)] = rec.x.grad", "self.grad_out[(i - 1, mb)] = rec.x.grad * 0.5", (EQUIV,),
           "the gradient handed to the layer below is halved"),
    Mutant("ckpt-no-dir-fsync-after-latest", "runtime/checkpoint.py",
           'os.replace(latest_tmp, os.path.join(ckpt_dir, "latest"))\n        _fsync_dir(ckpt_dir)\n',
           'os.replace(latest_tmp, os.path.join(ckpt_dir, "latest"))\n', (DURABLE,),
           "no directory fsync after `latest` is written"),
    Mutant("ckpt-no-tmp-dir-fsync", "runtime/checkpoint.py",
           "        _fsync_dir(tmp)\n", "", (DURABLE,),
           "the new step directory's entries are not synced before the rename"),
    Mutant("ckpt-no-file-fsync", "runtime/checkpoint.py",
           '    with open(path, "rb") as f:\n        os.fsync(f.fileno())\n\n\ndef _write_text',
           "\n\ndef _write_text", (DURABLE,),
           "tensor files are renamed into place without being synced"),
]


def _apply(root: str, m: Mutant) -> str | None:
    """Write the mutant into the copy at `root`; returns the original text, or None if the anchor is stale."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.count(m.old) != 1:
        return None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(m.old, m.new))
    return text


def _run_one(root: str, m: Mutant, limit_s: float, python: str) -> tuple[str, float, str]:
    """('caught' | 'survived' | 'STALE', seconds, last line of pytest's output)."""
    original = _apply(root, m)
    if original is None:
        return "STALE", 0.0, f"snippet not found exactly once in {m.file}"
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=limit_s)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        tail = lines[-1] if lines else ""
        if proc.returncode == 5 or "no tests ran" in tail:
            verdict = "STALE"   # the named tests are gone
        else:
            verdict = "survived" if proc.returncode == 0 else "caught"
    except subprocess.TimeoutExpired:
        verdict, tail = "caught", f"timed out after {limit_s:.0f} s"
    finally:
        with open(os.path.join(root, m.file), "w", encoding="utf-8") as f:
            f.write(original)
    return verdict, time.perf_counter() - t0, tail


def _baseline(roots: list[str], tests: list[str], limit_s: float, python: str) -> list[str]:
    """Run the chosen mutants' tests on the unmutated copies (split across them); the failing chunks' tails."""
    chunks = [tests[k::len(roots)] for k in range(len(roots))]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    def run(root_chunk):
        root, chunk = root_chunk
        if not chunk:
            return None
        try:
            proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chunk], cwd=root,
                                  env={**env, "PYTHONPATH": root}, capture_output=True, text=True,
                                  timeout=4 * limit_s)
        except subprocess.TimeoutExpired:
            return f"{chunk}: timed out"
        return None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-1500:]
    with ThreadPoolExecutor(len(roots)) as ex:
        return [r for r in ex.map(run, zip(roots, chunks)) if r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name or file contains this (a,b: either)")
    ap.add_argument("-j", type=int, default=2, help="mutants run at once, each in its own copy (default 2)")
    ap.add_argument("--limit-s", type=float, default=300.0, help="time limit per mutant (default 300 s)")
    ap.add_argument("--list", action="store_true", help="list the mutants and stop")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the tests on the unmutated copy first (they must pass for a verdict to mean "
                         "anything)")
    args = ap.parse_args(argv)
    keys = args.k.split(",")
    chosen = [m for m in MUTANTS if any(k in m.name or k in m.file for k in keys)]
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.file:24s} {m.why}")
        return 0
    jobs = max(1, min(args.j, len(chosen)))
    work = tempfile.mkdtemp(prefix="blockfit-mutants-")
    roots = []
    try:
        for k in range(jobs):
            roots.append(os.path.join(work, f"copy{k}"))
            shutil.copytree(REPO, roots[-1], ignore=SKIP)
        free = list(roots)
        results = {}
        started = time.perf_counter()
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            failed = _baseline(roots, tests, args.limit_s, sys.executable)
            if failed:
                print("BASELINE FAILED: the unmutated tests do not pass, so no verdict would mean anything:\n"
                      + "\n".join(failed))
                return 2
            print(f"baseline: {len(tests)} test targets pass unmutated ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        print(f"{len(chosen)} mutants, {jobs} at a time, copies under {work}", flush=True)

        def task(m: Mutant):
            root = free.pop()
            try:
                verdict, secs, tail = _run_one(root, m, args.limit_s, sys.executable)
            finally:
                free.append(root)
            results[m.name] = verdict
            loud = "  <<<<<<<<<< STALE: re-anchor this mutant" if verdict == "STALE" else ""
            print(f"{verdict:9s} {m.name:34s} {m.file:24s} {secs:6.1f} s  {tail[:90]}{loud}", flush=True)
        with ThreadPoolExecutor(jobs) as ex:
            list(ex.map(task, chosen))
        n = len(chosen)
        caught = sum(v == "caught" for v in results.values())
        survived = [k for k, v in results.items() if v == "survived"]
        stale = [k for k, v in results.items() if v == "STALE"]
        print(f"\nrun {n - len(stale)}, caught {caught}, survived {len(survived)}, stale {len(stale)} "
              f"({time.perf_counter() - started:.0f} s)")
        for k in survived:
            print(f"  SURVIVED: {k}")
        for k in stale:
            print(f"  STALE:    {k}")
        return 0 if caught == n else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
