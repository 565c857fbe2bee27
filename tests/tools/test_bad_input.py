"""A generated bad-input suite: every subcommand, every file the tool reads, each bad input exits 2 with one
paragraph on stderr, no traceback and no hang.

Cases are generated systematically: every number flag of every subcommand with 0 (where 0 is not allowed), -1,
nan, inf, 1e30, "abc" and ""; every field of a model config.json, a plan file, a hardware profile and a
checkpoint's meta.json with a wrong type, missing, negative, zero and huge; bad data files; bad traces and
summaries for compare; bad output paths. They run in process (tools.cli.run with argv, SystemExit caught, stderr
captured), so hundreds finish in seconds; those that could block (FIFOs, a config whose size would make the
profiler run for hours) run in a subprocess with a timeout as well.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from planner.hardware import Hardware, load_gpu
from planner.plan import write_atomic
from runtime.hf import hf_config_dict
from tools.cli import run as cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "runtime"))  # the runtime tests' helpers, in any import mode
from test_equivalence import TINY, tiny_plan  # noqa: E402

BAD_NUMBERS = ("0", "-1", "nan", "inf", "1e30", "abc", "")


# -- the good files every case starts from ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    plan = tiny_plan()
    write_atomic(str(d / "plan.json"), plan.to_json())
    other = tiny_plan(blocks=((0, 2), (3, 5)))
    write_atomic(str(d / "other-plan.json"), other.to_json())
    (d / "config.json").write_text(json.dumps(hf_config_dict(TINY)))
    (d / "hw.json").write_text(json.dumps(Hardware(gpu=load_gpu("rtx4090")).to_dict()))
    np.random.default_rng(0).integers(0, 256, 20000).astype(np.uint16).tofile(d / "tokens.bin")
    os.mkfifo(d / "fifo.json")
    (d / "file").write_text("x")
    # a checkpoint, a simulated trace and summary of each plan, quietly
    assert cli(["train", "--plan", str(d / "plan.json"), "--data", str(d / "tokens.bin"), "--cpu", "--quiet",
                "--steps", "2", "--ckpt-dir", str(d / "ck")]) == 0
    for name in ("plan", "other-plan"):
        assert cli(["simulate", "--plan", str(d / f"{name}.json"), "--json", "--trace", str(d / f"{name}-trace.json"),
                    "--summary", str(d / f"{name}-summary.json")]) == 0
    return d


def _write(path, obj) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


# -- case generation: each case is (id, function(env, tmp) -> argv) --------------------------------------------

CASES: list[tuple[str, object]] = []


def case(cid: str, make) -> None:
    CASES.append((cid, make))


def _train(e, *extra):
    return ["train", "--plan", str(e / "plan.json"), "--data", str(e / "tokens.bin"), "--cpu", "--quiet",
            "--steps", "2", *extra]


CHEAPEST = ["cheapest", "--model", "tiny", "--seq", "64", "--gpus", "rtx4090", "--gpus-max", "2", "--json",
            "--workers", "1"]

# number flags: (subcommand builder, flag, values that are fine and so skipped)
NUMBER_FLAGS = {
    "plan": (lambda e: ["plan", "--model", "tiny", "--gpu", "rtx4090", "--seq", "64", "--batch", "4"],
             {"--vram": (), "--host-ram": (), "--nvme": ("0",), "--pcie-gbps": (), "--nvme-read-gbps": (),
              "--nvme-write-gbps": (), "--cpu-adam": (), "--reserve": (), "--seq": (), "--batch": (),
              "--micro-batch": (), "--steps-per-block": (), "--seed": ("0",), "--max-blocks": (),
              "--min-blocks": (), "--blocks": (), "--time-limit": ()}),
    "train": (lambda e: _train(e),
              {"--steps": (), "--stop-after": (), "--ckpt-every": ("0",), "--lr": (), "--min-lr": ("0",),
               "--warmup": ("0",), "--weight-decay": ("0",), "--clip": ("0",), "--seed": ("0",), "--beta1": ("0",),
               "--beta2": ("0",), "--eps": (), "--skip-nonfinite": ("0",)}),
    "simulate": (lambda e: ["simulate", "--plan", str(e / "plan.json"), "--json"],
                 {"--vram": (), "--pcie-gbps": (), "--nvme-gbps": (), "--host-ram": (), "--micro-batch": (),
                  "--seq": (), "--straggler": (), "--slow-link": ()}),
    "sweep": (lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--json", "--workers", "1"],
              {"--seq": (), "--batch": (), "--host-ram": (), "--blocks": (), "--cpu-adam": (), "--workers": (),
               "--tokens": (), "--vram": (), "--gpus": (), "--nodes": ()}),
    "cheapest": (lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h"],
                 {"--tokens": (), "--gpus-max": (), "--per-node": (), "--seq": (), "--batch": (), "--host-ram": (),
                  "--runner-ups": ("0",), "--workers": ()}),
    "calibrate": (lambda e: ["calibrate", "--quick", "--quiet", "--out", str(e / "never.json")], {"--seq": ()}),
    "compare": (lambda e: ["compare", str(e / "plan-summary.json"), str(e / "plan-summary.json")], {"--top": ("0",)}),
}
for cmd, (base, flags) in NUMBER_FLAGS.items():
    for flag, fine in flags.items():
        for v in BAD_NUMBERS:
            if v not in fine:
                case(f"{cmd}{flag}={v or 'empty'}", lambda e, t, b=base, f=flag, v=v: b(e) + [f, v])

# names and paths given on the command line
for cid, argv in {
    "plan-gpu-empty": lambda e: ["plan", "--model", "tiny", "--gpu", ""],
    "plan-gpu-unknown": lambda e: ["plan", "--model", "tiny", "--gpu", "rtx9999"],
    "plan-gpu-path": lambda e: ["plan", "--model", "tiny", "--gpu", "../gpus/rtx4090"],
    "plan-model-empty": lambda e: ["plan", "--model", ""],
    "plan-model-unknown": lambda e: ["plan", "--model", "7bb"],
    "plan-model-missing-file": lambda e: ["plan", "--model", str(e / "nope.json")],
    "plan-model-dir-without-config": lambda e: ["plan", "--model", str(e)],
    "plan-model-fifo": lambda e: ["plan", "--model", str(e / "fifo.json")],
    "plan-hardware-fifo": lambda e: ["plan", "--model", "tiny", "--hardware", str(e / "fifo.json")],
    "plan-hardware-missing": lambda e: ["plan", "--model", "tiny", "--hardware", str(e / "nope.json")],
    "plan-hardware-dir": lambda e: ["plan", "--model", "tiny", "--hardware", str(e)],
    "plan-out-empty": lambda e: ["plan", "--model", "tiny", "--out", ""],
    "plan-out-dir": lambda e: ["plan", "--model", "tiny", "--out", str(e)],
    "plan-out-under-file": lambda e: ["plan", "--model", "tiny", "--out", str(e / "file" / "p.json")],
    "plan-out-fifo": lambda e: ["plan", "--model", "tiny", "--out", str(e / "fifo.json")],
    "plan-order": lambda e: ["plan", "--model", "tiny", "--order", "sideways"],
    "plan-method": lambda e: ["plan", "--model", "tiny", "--method", "lora"],
    "plan-blocks-and-min": lambda e: ["plan", "--model", "tiny", "--blocks", "2", "--min-blocks", "1"],
    "plan-min-above-max": lambda e: ["plan", "--model", "tiny", "--min-blocks", "3", "--max-blocks", "2"],
    "plan-unknown-flag": lambda e: ["plan", "--model", "tiny", "--vramm", "3"],
    "no-subcommand": lambda e: [],
    "unknown-subcommand": lambda e: ["plans"],
    "train-plan-missing": lambda e: ["train", "--plan", str(e / "nope.json"), "--data", str(e / "tokens.bin")],
    "train-plan-fifo": lambda e: ["train", "--plan", str(e / "fifo.json"), "--data", str(e / "tokens.bin")],
    "train-plan-empty-path": lambda e: ["train", "--plan", "", "--data", str(e / "tokens.bin")],
    "train-data-fifo": lambda e: ["train", "--plan", str(e / "plan.json"), "--data", str(e / "fifo.json")],
    "train-data-dir": lambda e: ["train", "--plan", str(e / "plan.json"), "--data", str(e)],
    "train-data-missing": lambda e: ["train", "--plan", str(e / "plan.json"), "--data", str(e / "no.bin")],
    "train-data-dtype": lambda e: _train(e, "--data-dtype", "int8"),
    "train-data-order": lambda e: _train(e, "--data-order", "random"),
    "train-metrics-dir": lambda e: _train(e, "--metrics", str(e)),
    "train-metrics-under-file": lambda e: _train(e, "--metrics", str(e / "file" / "m.jsonl")),
    "train-metrics-empty": lambda e: _train(e, "--metrics", ""),
    "train-trace-dir": lambda e: _train(e, "--trace", str(e)),
    "train-summary-missing-dir": lambda e: _train(e, "--summary", str(e / "no" / "s.json")),
    "train-ckpt-dir-file": lambda e: _train(e, "--ckpt-dir", str(e / "file")),
    "train-ckpt-dir-fifo": lambda e: _train(e, "--ckpt-dir", str(e / "fifo.json")),
    "train-ckpt-dir-under-file": lambda e: _train(e, "--ckpt-dir", str(e / "file" / "ck")),
    "train-ckpt-dir-empty": lambda e: _train(e, "--ckpt-dir", ""),
    "train-ckpt-every-without-dir": lambda e: _train(e, "--ckpt-every", "1"),
    "train-ckpt-dir-holds-a-run": lambda e: _train(e, "--ckpt-dir", str(e / "ck")),
    "train-resume-missing": lambda e: _train(e, "--resume", str(e / "nope")),
    "train-resume-file": lambda e: _train(e, "--resume", str(e / "file")),
    "train-resume-nothing": lambda e: _train(e, "--resume"),
    "train-resume-steps-not-beyond": lambda e: _train(e, "--resume", str(e / "ck")),
    "train-resume-changed-lr": lambda e: _train(e, "--resume", str(e / "ck"), "--lr", "1e-3", "--steps", "4"),
    "train-init-from-missing": lambda e: _train(e, "--init-from", str(e / "nope")),
    "train-tokenizer-missing": lambda e: ["train", "--plan", str(e / "plan.json"), "--data", str(e / "plan.json"),
                                          "--tokenizer", str(e / "nope"), "--cpu", "--quiet"],
    "train-min-lr-above-lr": lambda e: _train(e, "--min-lr", "1", "--lr", "0.1"),
    "train-lr-times-wd": lambda e: _train(e, "--lr", "1", "--weight-decay", "1"),
    "train-nvme-dir-file": lambda e: ["train", "--plan", str(e / "nvme-plan.json"), "--data", str(e / "tokens.bin"),
                                      "--cpu", "--nvme-dir", str(e / "file")],
    "simulate-plan-fifo": lambda e: ["simulate", "--plan", str(e / "fifo.json")],
    "simulate-plan-dir": lambda e: ["simulate", "--plan", str(e)],
    "simulate-gpu-empty": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--gpu", ""],
    "simulate-gpu-unknown": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--gpu", "h900"],
    "simulate-gpu-and-hardware": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--gpu", "h100-sxm",
                                            "--hardware", str(e / "hw.json")],
    "simulate-hardware-fifo": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--hardware",
                                         str(e / "fifo.json")],
    "simulate-trace-dir": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--trace", str(e)],
    "simulate-summary-empty": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--summary", ""],
    "simulate-plot-under-file": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--plot",
                                           str(e / "file" / "m.png")],
    "simulate-seq-above-max": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--seq", "100000"],
    "simulate-micro-batch-not-dividing": lambda e: ["simulate", "--plan", str(e / "plan.json"), "--micro-batch", "3"],
    "sweep-model-empty": lambda e: ["sweep", "--model", "", "--gpu", "rtx4090"],
    "sweep-model-commas": lambda e: ["sweep", "--model", ",,", "--gpu", "rtx4090"],
    "sweep-model-unknown": lambda e: ["sweep", "--model", "tiny,9b", "--gpu", "rtx4090"],
    "sweep-model-fifo": lambda e: ["sweep", "--model", str(e / "fifo.json"), "--gpu", "rtx4090"],
    "sweep-gpu-empty": lambda e: ["sweep", "--model", "tiny", "--gpu", ""],
    "sweep-gpu-unknown": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090,gtx1080"],
    "sweep-method": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--method", "bcd,lora"],
    "sweep-vram-range-inf": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "0:inf:1"],
    "sweep-vram-range-nan": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "1:nan:1"],
    "sweep-vram-range-backwards": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "8:4:1"],
    "sweep-vram-range-zero-step": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "4:8:0"],
    "sweep-vram-range-two-parts": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "4:8"],
    "sweep-vram-range-huge": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "1:4000:0.001"],
    "sweep-vram-list-word": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--vram", "8,big"],
    "sweep-csv-dir": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--csv", str(e)],
    "sweep-plot-empty": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--plot", ""],
    "sweep-blocks-exact": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--blocks", "2", "--exact"],
    "sweep-gpus-over-nodes": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--gpus", "3", "--nodes", "2"],
    "sweep-interconnect": lambda e: ["sweep", "--model", "tiny", "--gpu", "rtx4090", "--gpus", "2", "--nodes", "2",
                                     "--interconnect", "pigeon"],
    "cheapest-deadline-word": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "soon"],
    "cheapest-deadline-zero": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "0h"],
    "cheapest-deadline-empty": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", ""],
    "cheapest-deadline-nan": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "nanh"],
    "cheapest-gpu-unknown": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h", "--gpus", "gtx480"],
    "cheapest-gpu-empty": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h", "--gpus", ","],
    "cheapest-gpu-unpriced": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h", "--gpus", "a100-40g"],
    "cheapest-method": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h", "--method", "lora"],
    "cheapest-interconnect": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h", "--interconnect", "x"],
    "cheapest-model-unknown": lambda e: CHEAPEST + ["--tokens", "1e8", "--deadline", "1h", "--model", "9b"],
    "cheapest-none-meets": lambda e: CHEAPEST + ["--tokens", "1e16", "--deadline", "1s"],
    "calibrate-out-dir": lambda e: ["calibrate", "--out", str(e)],
    "calibrate-out-empty": lambda e: ["calibrate", "--out", ""],
    "calibrate-out-under-file": lambda e: ["calibrate", "--out", str(e / "file" / "hw.json")],
    "calibrate-dir-file": lambda e: ["calibrate", "--quick", "--out", str(e / "never.json"), "--dir", str(e / "file")],
    "calibrate-dir-missing": lambda e: ["calibrate", "--quick", "--out", str(e / "never.json"), "--dir",
                                        str(e / "nope")],
    "calibrate-model-unknown": lambda e: ["calibrate", "--quick", "--out", str(e / "never.json"), "--model", "5b"],
    "calibrate-model-fifo": lambda e: ["calibrate", "--quick", "--out", str(e / "never.json"), "--model",
                                       str(e / "fifo.json")],
    "calibrate-dtype": lambda e: ["calibrate", "--out", str(e / "never.json"), "--dtype", "int8"],
    "calibrate-device": lambda e: ["calibrate", "--out", str(e / "never.json"), "--device", "tpu"],
    "compare-fifo-measured": lambda e: ["compare", str(e / "fifo.json"), str(e / "plan-trace.json")],
    "compare-fifo-predicted": lambda e: ["compare", str(e / "plan-trace.json"), str(e / "fifo.json")],
    "compare-missing": lambda e: ["compare", str(e / "nope.json"), str(e / "plan-trace.json")],
    "compare-dir": lambda e: ["compare", str(e), str(e / "plan-trace.json")],
    "compare-trace-vs-summary": lambda e: ["compare", str(e / "plan-trace.json"), str(e / "plan-summary.json")],
    "compare-two-plans-traces": lambda e: ["compare", str(e / "other-plan-trace.json"), str(e / "plan-trace.json")],
    "compare-plan-file": lambda e: ["compare", str(e / "plan.json"), str(e / "plan-trace.json")],
    "compare-one-arg": lambda e: ["compare", str(e / "plan-trace.json")],
}.items():
    case(cid, lambda e, t, a=argv: a(e))


# -- model config.json fields ----------------------------------------------------------------------------------

def _good_config() -> dict:
    return hf_config_dict(TINY)


INT_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "max_position_embeddings")
CONFIG_EDITS: dict[str, object] = {}
for f in INT_FIELDS:
    for name, v in (("str", "64"), ("float", 64.5), ("neg", -1), ("zero", 0), ("bool", True), ("list", [64]),
                    ("huge", 2**40), ("null", None)):
        CONFIG_EDITS[f"{f}-{name}"] = (f, v)
    if f not in ("num_key_value_heads", "max_position_embeddings"):   # these two have defaults
        CONFIG_EDITS[f"{f}-missing"] = (f, KeyError)
CONFIG_EDITS.update({
    "vocab_size-2^60": ("vocab_size", 2**60), "num_hidden_layers-1e9": ("num_hidden_layers", 10**9),
    "num_hidden_layers-1e9-float": ("num_hidden_layers", 1e9), "hidden-65-heads-4": ("hidden_size", 65),
    "rope_theta-nan": ("rope_theta", float("nan")), "rope_theta-inf": ("rope_theta", float("inf")),
    "rope_theta-neg": ("rope_theta", -1.0), "rope_theta-str": ("rope_theta", "1e4"),
    "rms_norm_eps-zero": ("rms_norm_eps", 0), "rms_norm_eps-nan": ("rms_norm_eps", float("nan")),
    "rms_norm_eps-list": ("rms_norm_eps", [1e-5]),
    "tie-string-false": ("tie_word_embeddings", "false"), "tie-int": ("tie_word_embeddings", 0),
    "attention_bias-string": ("attention_bias", "true"),
    "architectures-nested": ("architectures", [["LlamaForCausalLM"]]), "architectures-dict": ("architectures", [{}]),
    "architectures-str": ("architectures", "LlamaForCausalLM"), "architectures-unknown": ("architectures", ["Gpt2"]),
    "architectures-int": ("architectures", [3]), "head_dim-other": ("head_dim", 32),
    "kv-not-dividing": ("num_key_value_heads", 3),
})


def _config_case(field, value):
    def make(e, t):
        c = _good_config()
        if value is KeyError:
            c.pop(field, None)
        else:
            c[field] = value
        return ["plan", "--model", _write(t / "config.json", c), "--gpu", "rtx4090"]
    return make


for cid, (field, value) in CONFIG_EDITS.items():
    case(f"config-{cid}", _config_case(field, value))
for cid, text in {"not-json": "{", "list": "[1, 2]", "number": "3", "empty": "", "deep": "[" * 100000 + "]" * 100000,
                  "not-utf8": b"\xff\xfe{}".decode("latin-1")}.items():
    case(f"config-file-{cid}", lambda e, t, text=text: ["plan", "--model", _write(t / "c.json", text)])
case("config-file-not-utf8-bytes",
     lambda e, t: ["plan", "--model", (t / "c.json").write_bytes(b"\xff\xfe\x00{") and str(t / "c.json")])


# -- plan file fields --------------------------------------------------------------------------------------------

def _plan_dict(e) -> dict:
    return json.loads((e / "plan.json").read_text())


def _refingerprint(d: dict) -> None:
    """Keep the fingerprint consistent with an edited model, so the field's own validator is what refuses."""
    from planner.models import ModelConfig
    try:
        d["fingerprint"] = ModelConfig(**d["model"]).fingerprint()
    except Exception:
        pass


def _set(d: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for k in head:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value is KeyError:
        del d[last]
    elif isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


PLAN_FIELDS = {  # field -> values to try (KeyError: delete it)
    "model.hidden": (0, -64, "64", 2**40, 65, KeyError), "model.heads": (0, -1, 3, "4", KeyError),
    "model.kv_heads": (0, 3), "model.layers": (0, 10**9, 2.5), "model.vocab": (0, -1, 2**60),
    "model.ffn": (0, 2**40), "model.max_seq": (0, 16), "model.rope_theta": (float("nan"), -1, "x"),
    "model.norm_eps": (0, float("inf")), "model.tie_embeddings": ("false", 1), "model.attention_bias": ("no",),
    "model.arch": ("gpt2", 3),
    "hardware.gpu.h2d_gbps": (0, -1, float("nan"), "fast"), "hardware.gpu.d2h_gbps": (0, -5),
    "hardware.gpu.bf16_tflops": (0, -1, float("inf")), "hardware.gpu.memory_gbps": (0,),
    "hardware.gpu.vram_gib": (0, -24, 1e30), "hardware.host.nvme_read_gbps": (0, -1),
    "hardware.host.nvme_write_gbps": (0,), "hardware.host.cpu_adam_params_per_s": (0, -1),
    "hardware.host.ram_gib": (-1,), "hardware.host.nvme_gib": (-1, float("nan")), "hardware.eff.matmul_max": (0, 2),
    "hardware.gpu": ("rtx4090", KeyError), "hardware": (KeyError, []),
    "shape.gpus": (2, 0), "shape.seq_len": (0, 100000, "32"), "shape.micro_batch": (0, -1, 1.5),
    "shape.grad_accum": (0,), "shape": (KeyError, [2, 32]),
    "budget_bytes": (0, -1, "1GiB"), "reserve_bytes": (-1, 2**62), "steps_per_block": (0, -2, 1e3),
    "seed": (-1, 2**64, "0"), "method": ("lora", 1), "order": ("sideways",), "switch_state": ("keep_gpu",),
    "blocks": ([], [{"first": 0, "last": 99}], [{"first": 2, "last": 1}], "all", KeyError),
    "blocks.0.first": (-1, "0"), "placements": ([], KeyError), "placements.0.weights": ("disk",),
    "placements.1.activations": ("ssd",), "placements.2.grads": ("nvme",), "placements.0.layer": (3,),
    "prefetch_window_bytes": (-1,), "predicted": ([], KeyError), "predicted.phases": ([],),
    "predicted.host_ram_bytes": (-1, "x"), "predicted.nvme_bytes": (-1,), "predicted.cycle_seconds": (-1.0,),
    "predicted.phases.0.peak_vram_bytes": (-1,), "solver": (KeyError, 3), "schema": (2, "1", KeyError),
    "fingerprint": ("0000",),
}


def _plan_case(cmd, field, value):
    def make(e, t):
        d = _plan_dict(e)
        _set(d, field, value)
        if field.startswith("model."):
            _refingerprint(d)
        path = _write(t / "plan.json", d)
        if cmd == "simulate":
            return ["simulate", "--plan", path, "--json"]
        return ["train", "--plan", path, "--data", str(e / "tokens.bin"), "--cpu", "--quiet", "--steps", "1"]
    return make


for field, values in PLAN_FIELDS.items():
    for v in values:
        for cmd in ("simulate", "train"):
            label = "missing" if v is KeyError else repr(v)[:20]
            case(f"plan-{cmd}-{field}={label}", _plan_case(cmd, field, v))
DEEP_OBJECT = "{\"a\":" * 50000 + "1" + "}" * 50000
for cid, text in {"not-json": "{", "list": "[]", "deep": DEEP_OBJECT, "nan-only": "NaN"}.items():
    case(f"plan-file-{cid}", lambda e, t, text=text: ["simulate", "--plan", _write(t / "p.json", text)])


# -- hardware profile fields ------------------------------------------------------------------------------------

def _hw_case(cmd, field, value):
    def make(e, t):
        d = json.loads((e / "hw.json").read_text())
        _set(d, field, value)
        path = _write(t / "hw.json", d)
        if cmd == "plan":
            return ["plan", "--model", "tiny", "--hardware", path]
        return ["simulate", "--plan", str(e / "plan.json"), "--hardware", path, "--json"]
    return make


HW_FIELDS = {"gpu.h2d_gbps": (0, -1, float("nan"), "x"), "gpu.bf16_tflops": (0, -1, float("inf")),
             "gpu.memory_gbps": (0,), "gpu.vram_gib": (0, -1), "gpu.d2h_gbps": (-3,),
             "host.nvme_read_gbps": (0, -1), "host.nvme_write_gbps": (0,), "host.cpu_adam_params_per_s": (0,),
             "host.nvme_gib": (-1, float("nan")), "host.ram_gib": (0,), "eff.matmul_max": (0, 5),
             "eff.memory": (-1,), "gpu.price_per_hour": (-1, "cheap"), "gpu": (KeyError, [], "rtx4090"),
             "host": ([],), "gpu.unknown_field": (1,), "gpu.shared_cores": (-1, 1.5, "x", True),
             "gpu.adam_params_per_s": (-1, float("nan"), "fast"), "gpu.collective_cpu_gbps": (-0.5, float("inf"))}
for field, values in HW_FIELDS.items():
    for v in values:
        for cmd in ("plan", "simulate"):
            label = "missing" if v is KeyError else repr(v)[:20]
            case(f"hw-{cmd}-{field}={label}", _hw_case(cmd, field, v))
for cid, text in {"not-json": "{", "list": "[]", "deep": "[" * 100000 + "]" * 100000}.items():
    case(f"hw-file-{cid}",
         lambda e, t, text=text: ["plan", "--model", "tiny", "--hardware", _write(t / "h.json", text)])


# -- checkpoint meta.json -------------------------------------------------------------------------------------

def _ckpt_case(edit):
    def make(e, t):
        src = e / "ck" / "step-000002"
        dst = t / "ck" / "step-000002"
        shutil.copytree(src, dst)
        raw = json.loads((dst / "meta.json").read_text())
        out = edit(raw)
        (dst / "meta.json").write_text(out if isinstance(out, str) else json.dumps(raw))
        return _train(e, "--resume", str(dst), "--steps", "4")
    return make


def _m(path, value):
    def edit(raw):
        _set(raw, path, value)
    return edit


CKPT_EDITS = {
    "active_block-99": _m("meta.active_block", 99), "active_block--1": _m("meta.active_block", -1),
    "active_block-str": _m("meta.active_block", "0"), "step--5": _m("step", -5), "step-str": _m("step", "2"),
    "step-missing": _m("step", KeyError), "format": _m("format", "other/1"),
    "optimizer-missing-layer": lambda raw: raw["meta"]["optimizer"].update({"4": {"step": 1, "where": "kept"}}),
    "optimizer-entry-dropped": lambda raw: raw["meta"]["optimizer"].clear(),
    "optimizer-step-neg": lambda raw: [v.update(step=-5) for v in raw["meta"]["optimizer"].values()],
    "optimizer-where": lambda raw: [v.update(where="gpu") for v in raw["meta"]["optimizer"].values()],
    "optimizer-key": lambda raw: raw["meta"]["optimizer"].update({"x": {"step": 1, "where": "kept"}}),
    "optimizer-list": _m("meta.optimizer", []),
    "rng-empty": _m("meta.rng", {}), "rng-python": _m("meta.rng.python", [3, [1, 2], None]),
    "rng-torch-b64": _m("meta.rng.torch", "!!notbase64"), "rng-torch-short": _m("meta.rng.torch", "AAAA"),
    "rng-numpy": _m("meta.rng.numpy", ["MT19937", [1], 0, 0, 0.0]), "rng-null": _m("meta.rng", None),
    "data-empty": _m("meta.data", {}), "data-epoch-neg": _m("meta.data.epoch", -1),
    "data-position-huge": _m("meta.data.position", 10**9), "data-seed-str": _m("meta.data.seed", "x"),
    "data-list": _m("meta.data", [1]), "data-seq-other": _m("meta.data.seq_len", 64),
    "data-windows-list": _m("meta.data.n_windows", [1]),
    "position-missing": _m("meta.position", KeyError), "position-str": _m("meta.position", "x"),
    "plan-blocks": _m("meta.plan.blocks", [[0, 5]]), "plan-fingerprint": _m("meta.plan.fingerprint", "x"),
    "plan-missing": _m("meta.plan", KeyError), "meta-list": _m("meta", [1]),
    "files-str": _m("files", "x"),
    "files-sha": lambda raw: raw["files"].update({"model.safetensors": {"bytes": 1, "sha256": "0"}}),
    "not-json": lambda raw: "{", "deep": lambda raw: "[" * 100000 + "]" * 100000, "list": lambda raw: "[]",
    # the world that saved it (runtime/ckpt_world.py)
    "world-str": _m("world", "x"), "world-size-0": _m("world.size", 0),
    "world-shards-3": _m("world.optimizer_shards", 3), "world-size-2-no-ranks": _m("world.size", 2),
    "world-numel-neg": _m("world.optimizer_numel", {"L1.state": -1}),
    "world-ranks-short": lambda raw: (_set(raw, "world.size", 2), _set(raw, "world.ranks", [{}]))[0],
}
for cid, edit in CKPT_EDITS.items():
    case(f"ckpt-{cid}", _ckpt_case(edit))


def _ckpt_file_case(name, damage):
    def make(e, t):
        dst = t / "ck" / "step-000002"
        shutil.copytree(e / "ck" / "step-000002", dst)
        path = dst / name
        if damage == "missing":
            os.unlink(path)
        elif damage == "truncated":
            os.truncate(path, os.path.getsize(path) // 2)
        elif damage == "garbage":
            path.write_bytes(b"\x00" * 64)
        else:
            data = bytearray(path.read_bytes())
            data[-50] ^= 1
            path.write_bytes(bytes(data))
        return _train(e, "--resume", str(dst), "--steps", "4")
    return make


def _ckpt_swapped_case(name):
    """A tensor file replaced by another with its checksum updated: it verifies, but does not fit the model."""
    def make(e, t):
        import torch
        from safetensors.torch import save_file

        from runtime.checkpoint import file_digest
        dst = t / "ck" / "step-000002"
        shutil.copytree(e / "ck" / "step-000002", dst)
        save_file({"L2.state" if name.startswith("optimizer") else "model.embed_tokens.weight": torch.zeros(3)},
                  str(dst / name))
        raw = json.loads((dst / "meta.json").read_text())
        raw["files"][name] = file_digest(str(dst / name))
        (dst / "meta.json").write_text(json.dumps(raw))
        return _train(e, "--resume", str(dst), "--steps", "4")
    return make


case("ckpt-swapped-model", _ckpt_swapped_case("model.safetensors"))
case("ckpt-swapped-optimizer", _ckpt_swapped_case("optimizer.safetensors"))
for name in ("model.safetensors", "optimizer.safetensors", "meta.json"):
    for damage in ("missing", "truncated", "garbage", "bitflip"):
        if not (name == "meta.json" and damage == "bitflip"):
            case(f"ckpt-file-{name}-{damage}", _ckpt_file_case(name, damage))


# -- data files -------------------------------------------------------------------------------------------------

def _data_case(name, make_file, *extra):
    def make(e, t):
        path = t / name
        make_file(path)
        return ["train", "--plan", str(e / "plan.json"), "--data", str(path), "--cpu", "--quiet", "--steps", "1",
                *extra]
    return make


DATA_CASES = {
    "empty-bin": ("d.bin", lambda p: p.write_bytes(b"")),
    "odd-bin": ("d.bin", lambda p: p.write_bytes(b"\x01" * 20001)),
    "short-bin": ("d.bin", lambda p: np.zeros(50, np.uint16).tofile(p)),
    "vocab-bin": ("d.bin", lambda p: np.full(20000, 300, np.uint16).tofile(p)),
    "u32-as-u16": ("d.bin", lambda p: np.full(20000, 70000, np.uint32).tofile(p)),
    "float-npy": ("d.npy", lambda p: np.save(p, np.zeros(20000, np.float32))),
    "2d-npy": ("d.npy", lambda p: np.save(p, np.zeros((200, 100), np.int32))),
    "neg-npy": ("d.npy", lambda p: np.save(p, np.full(20000, -1, np.int64))),
    "garbage-npy": ("d.npy", lambda p: p.write_bytes(b"not an npy file at all" * 100)),
    "object-npy": ("d.npy", lambda p: np.save(p, np.array([{}], dtype=object), allow_pickle=True)),
    "non-utf8-txt": ("d.txt", lambda p: p.write_bytes(bytes(range(256)) * 100)),
    "empty-txt": ("d.txt", lambda p: p.write_bytes(b"")),
    "short-txt": ("d.txt", lambda p: p.write_text("hello")),
    "dir": ("d", lambda p: p.mkdir()),
}
for cid, (name, make_file) in DATA_CASES.items():
    case(f"data-{cid}", _data_case(name, make_file))
case("data-dtype-mismatch", _data_case("d.u32.bin", lambda p: np.zeros(20000, np.uint32).tofile(p),
                                       "--data-dtype", "uint16"))
case("data-dtype-text", _data_case("d.txt", lambda p: p.write_text("hello " * 5000), "--data-dtype", "uint16"))
case("data-changed-on-resume", lambda e, t: (np.random.default_rng(5).integers(0, 256, 20000).astype(np.uint16)
                                             .tofile(t / "d.bin"), _train(e, "--resume", str(e / "ck"), "--steps", "4",
                                                                          "--data", str(t / "d.bin")))[1])


# -- traces and summaries for compare ---------------------------------------------------------------------------

def _trace(e) -> dict:
    return json.loads((e / "plan-trace.json").read_text())


def _first_x(d: dict) -> dict:
    return next(ev for ev in d["traceEvents"] if ev.get("ph") == "X" and (ev.get("args") or {}).get("kind") != "step")


def _trace_edit(fn):
    def edit(d):
        fn(_first_x(d))
    return edit


TRACE_EDITS = {
    "negative-dur": _trace_edit(lambda ev: ev.update(dur=-5)), "nan-dur": _trace_edit(lambda ev: ev.update(dur="nan")),
    "inf-ts": _trace_edit(lambda ev: ev.update(ts=float("inf"))), "no-ts": _trace_edit(lambda ev: ev.pop("ts")),
    "args-list": _trace_edit(lambda ev: ev.update(args=[1])), "tid-list": _trace_edit(lambda ev: ev.update(tid=[1])),
    "layer-str": _trace_edit(lambda ev: ev["args"].update(layer="L1")),
    "id-str": _trace_edit(lambda ev: ev["args"].update(id="x")),
    "events-dict": lambda d: d.update(traceEvents={"a": 1}), "events-empty": lambda d: d.update(traceEvents=[]),
    "step-negative": lambda d: [ev.update(dur=-1) for ev in d["traceEvents"]
                                if (ev.get("args") or {}).get("kind") == "step"],
}


def _compare_case(good_name, load, edit, which):
    """compare with one input edited (as the measured side or the predicted side) and the other intact."""
    def make(e, t):
        d = load(e)
        edit(d)
        bad = _write(t / "bad.json", d)
        good = str(e / good_name)
        return ["compare", bad, good] if which == "measured" else ["compare", good, bad]
    return make


for cid, edit in TRACE_EDITS.items():
    for which in ("measured", "predicted"):
        case(f"compare-trace-{cid}-{which}", _compare_case("plan-trace.json", _trace, edit, which))

SUMMARY_EDITS = {
    "negative-step": lambda d: d["step_seconds_by_phase"].update({k: -1.0 for k in d["step_seconds_by_phase"]}),
    "nan-step": lambda d: d["step_seconds_by_phase"].update({k: float("nan") for k in d["step_seconds_by_phase"]}),
    "no-phases": lambda d: (d.pop("step_seconds_by_phase"), d.pop("phases", None)),
    "phases-str": lambda d: (d.pop("step_seconds_by_phase"), d.update(phases="x")),
}


for cid, edit in SUMMARY_EDITS.items():
    for which in ("measured", "predicted"):
        case(f"compare-summary-{cid}-{which}",
             _compare_case("plan-summary.json", lambda e: json.loads((e / "plan-summary.json").read_text()),
                           edit, which))
case("compare-two-plans-summaries", lambda e, t: ["compare", str(e / "other-plan-summary.json"),
                                                  str(e / "plan-summary.json")])
for cid, text in {"not-json": "{", "number": "3", "deep": "[" * 100000 + "]" * 100000, "empty-object": "{}"}.items():
    case(f"compare-file-{cid}", lambda e, t, text=text: ["compare", _write(t / "x.json", text),
                                                         str(e / "plan-trace.json")])


# -- the test --------------------------------------------------------------------------------------------------

def _one_paragraph(err: str) -> bool:
    lines = err.strip().splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and "\n\n" not in err.strip() \
        and all(not ln.startswith("error: ") for ln in lines[:-1])


@pytest.fixture(scope="module")
def nvme_plan(env):
    from test_equivalence import CASES as RCASES
    write_atomic(str(env / "nvme-plan.json"), tiny_plan(**RCASES["tiers-ascending-reset"]).to_json())


@pytest.mark.parametrize("cid,make", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_paragraph(env, nvme_plan, tmp_path, capsys, cid, make):
    argv = make(env, tmp_path)
    capsys.readouterr()
    try:
        code = cli(argv)
    except SystemExit as e:   # tools.cli.run returns; a SystemExit here would be a bug too, but say what it was
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, err
    assert code == 2, f"exit {code} for {argv}\nstdout: {out[-500:]}\nstderr: {err[-500:]}"
    assert _one_paragraph(err), err


def test_the_suite_is_large_enough():
    assert len(CASES) >= 300, len(CASES)


# -- the ones that could hang: in a subprocess, with a timeout ------------------------------------------------

@pytest.mark.parametrize("which", ["model", "hardware", "plan", "compare", "data", "layers-1e9"])
def test_no_hang_in_a_subprocess(env, tmp_path, which):
    fifo = str(env / "fifo.json")
    if which == "layers-1e9":
        c = _good_config()
        c["num_hidden_layers"] = 10**9
        argv = ["plan", "--model", _write(tmp_path / "c.json", c)]
    else:
        argv = {"model": ["plan", "--model", fifo], "hardware": ["plan", "--model", "tiny", "--hardware", fifo],
                "plan": ["simulate", "--plan", fifo], "compare": ["compare", fifo, fifo],
                "data": ["train", "--plan", str(env / "plan.json"), "--data", fifo, "--cpu"]}[which]
    proc = subprocess.run([sys.executable, "-m", "tools.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and _one_paragraph(proc.stderr), proc.stderr


def test_the_case_count_and_kinds():
    """Every subcommand and every kind of file is in the suite."""
    ids = [c[0] for c in CASES]
    for prefix in ("plan-", "train-", "simulate-", "sweep-", "calibrate-", "compare-", "cheapest-", "config-",
                   "plan-simulate-",
                   "plan-train-", "hw-", "ckpt-", "data-", "compare-trace-", "compare-summary-"):
        assert sum(i.startswith(prefix) for i in ids) >= 5, prefix
