"""FSDP2 full-parameter training on 2 gloo ranks (runtime/fsdp.py) equals 1-rank full training.

One torchrun launch (this file run as a script, 2 ranks, one thread each) trains every case below and rank 0
writes each case's metrics and final weights; the tests compare them with two references computed here: the
BCD runtime's single-GPU full method (runtime.trainer.Trainer, 1 rank accumulating the same global batch), and a
plain PyTorch loop (LlamaModel, torch.optim.AdamW, clip_grad_norm_, the same windows).

Why equality can be bitwise. With rank r taking micro-batches r*g .. r*g+g-1 of a step's 2g, each micro-batch's
gradient is computed from the same fp32 weights (an all-gather copies them exactly) by the same kernels. Scaling
by a power of two is exact, so loss / g followed by FSDP2's ReduceOp.AVG over 2 ranks gives the same numbers as
loss / 2g. What can differ is only the association of the sum of the 2g micro-batch gradients g_k:
  1 rank, sequential .grad accumulation:    ((g0 + g1) + g2) + g3 ...
  FSDP2, reduce-scatter per micro-batch:    (g0 + g2) + (g1 + g3)   (rank 0's k-th plus rank 1's k-th, then +=)
  FSDP2, deferred (set_requires_gradient_sync): (g0 + g1) + (g2 + g3)
With g = 1 all three are one two-term sum, a + b = b + a: bitwise equal, so 2 ranks equal the 1-rank runtime
bitwise. With g = 2 the plain loop in the test sums in FSDP2's association and is again bitwise equal. The
gradient-norm clip is the one other reduction whose order differs (FSDP2 sums squared shard norms over the ranks);
a clip coefficient min(1, clip / (norm + 1e-6)) is exactly 1.0 when the norm is below the clip, so the bitwise
cases clip at 100 (their norms are about 1-3: asserted).

The bound, where the clip is active (case "clipped", one step, compared with the plain loop in the same
association). Only the norm differs: both runs compute the 2-norm of the same P fp32 gradient elements in
different orders. A sum of P non-negative terms in any order is within gamma_P = P u / (1 - P u) of the exact sum
(u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4), squaring adds u and the
square root halves the relative error and adds u, so each norm is within gamma_P / 2 + 2u of the exact norm and
the clip coefficients c differ by a relative delta <= gamma_P + 8u (the coefficient's own division and the
scaling of each gradient, u each, on both sides). At step 1 AdamW moves element i by lr * f(x_i) with
x_i = c G_i and f(x) = x / (|x| + eps) (m = (1 - b1) x, sqrt(v) = sqrt(1 - b2) |x|, bias-corrected). f'(x) =
eps / (|x| + eps)^2, and |x| eps / (|x| + eps)^2 is at most 1/4 (AM-GM) and at most eps / |x|, so a relative
change d of x moves f by at most |d| min(1/4, eps / |x|) / (1 - |d|)^2, less than |d| min(1, eps / |x|): the
exact updates differ by at most lr delta min(1, eps / |x_i|). Each run's computed update is within 8 roundings
(lerp, the product and sum of v, sqrt, two divisions, + eps, the step size) of its exact value, |f| <= 1, and the
final w - update rounds once more. So

    |w_A,i - w_B,i| <= lr (delta min(1, eps / |x_i|) + 16 u) + 2 u |w_i|

with x_i and w_i taken from the reference (x_i = c G_i in float64). The weight decay w (1 - lr wd) is the same
product on the same numbers in both runs: no term. The logged norms obey |n - ||G||| <= (gamma_P / 2 + 2u) ||G||.
AdamW is nearly scale-invariant (only eps sees the gradient's scale), so a wrongly scaled gradient (a rank
clipping by its own shard's norm, a missing 1/2) shows in the logged norm, which every case checks against the
plain loop's within gamma_P + 4u; another rank's windows change G itself and move elements by about lr (AdamW's
first update is about lr sign(G)), far outside the bound, which is a few ulps for all but elements with |x| near
eps.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, HERE]   # run as a script under torchrun; test_equivalence's helpers in any import mode

from test_equivalence import reference_lr, train, write_tokens  # noqa: E402

from planner.errors import UserError  # noqa: E402
from planner.hardware import make_hardware  # noqa: E402
from planner.llama import LlamaModel  # noqa: E402
from planner.models import CATALOG  # noqa: E402
from planner.plan import Placement, Plan, Shape, load_plan  # noqa: E402
from planner.planning import Request, make_plan  # noqa: E402
from runtime.data import TokenData  # noqa: E402
from runtime.optim import AdamWConfig  # noqa: E402
from runtime.trainer import TrainConfig  # noqa: E402

TINY = CATALOG["tiny"]
TIED = dataclasses.replace(TINY, name="tiny-tied", tie_embeddings=True)
MB, SEQ, STEPS = 2, 32, 3
U = 2.0 ** -24
TC = TrainConfig(steps=STEPS, lr=1e-2, min_lr=1e-3, warmup=1, quiet=True, force_cpu=True,
                 adamw=AdamWConfig(weight_decay=0.1, clip=100.0))
CLIPPED = dataclasses.replace(TC, adamw=dataclasses.replace(TC.adamw, clip=0.5))


@functools.lru_cache(maxsize=None)
def _made(gpus: int, tied: bool) -> Plan:
    hw = make_hardware(gpu="rtx4090", vram_gib=1, host_ram_gib=8, nvme_gib=10)
    return make_plan(TIED if tied else TINY, hw, Request(method="full", gpus=gpus, vram_gib=1, reserve_gib=0.5,
                                                         seq_len=SEQ, batch=4, micro_batch=MB, time_limit_s=5))


def plan_for(*, gpus: int, grad_accum: int, tied: bool = False, state: str = "gpu", acts: str = "gpu",
             method: str = "full") -> Plan:
    """A full plan (make_plan, gpus GPUs) with this per-rank shape, every layer's state on `state`."""
    base = _made(gpus, tied)
    places = tuple(Placement(layer=p.layer, weights="gpu", master=state, moments=state, grads=state,
                             activations=acts) for p in base.placements)
    return dataclasses.replace(base, shape=Shape(micro_batch=MB, seq_len=SEQ, grad_accum=grad_accum, gpus=gpus),
                               placements=places, method=method)


def _tc_dict(tc: TrainConfig) -> dict:
    return {"steps": tc.steps, "lr": tc.lr, "min_lr": tc.min_lr, "warmup": tc.warmup,
            "adamw": dataclasses.asdict(tc.adamw)}


# name -> (plan kwargs, train config, defer_reduce, param dtype)
CASES = {
    "micro": (dict(grad_accum=2), TC, False, "float32"),
    "deferred": (dict(grad_accum=2), TC, True, "float32"),
    "offload": (dict(grad_accum=2, state="cpu", acts="recompute"), TC, False, "float32"),
    "tied": (dict(grad_accum=1, tied=True), TC, False, "float32"),
    "clipped": (dict(grad_accum=1), dataclasses.replace(CLIPPED, steps=1), False, "float32"),
    "bf16": (dict(grad_accum=1), TC, False, "bfloat16"),
}


# -- the worker: run as a script under torchrun ---------------------------------------------------------------

def _worker(work: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from runtime.dist import from_env
    from runtime.fsdp import FsdpTrainer
    from runtime.store import Target
    from tools.cli import run as cli
    spec = json.load(open(os.path.join(work, "spec.json")))
    world = from_env()
    dist.init_process_group("gloo", rank=world.rank, world_size=world.size)
    try:
        for argv in spec["cli"]:   # the command line's path, in this process group
            assert cli(argv) == 0, argv
        for name, run in spec["runs"].items():
            plan = load_plan(run["plan"])
            data = TokenData.open(spec["data"], seq_len=SEQ, seed=0)
            t = run["train"]
            tc = TrainConfig(steps=t["steps"], lr=t["lr"], min_lr=t["min_lr"], warmup=t["warmup"], quiet=True,
                             force_cpu=True, adamw=AdamWConfig(**t["adamw"]))
            tr = FsdpTrainer(plan, data, tc, world=world, target=Target.detect(force_cpu=True),
                             defer_reduce=run["defer"], param_dtype=getattr(torch, run["dtype"]))
            recs = [tr.step() for _ in range(tc.steps)]
            weights = tr.weights()
            if world.leader:
                save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(work, f"{name}.safetensors"))
                with open(os.path.join(work, f"{name}.json"), "w") as f:
                    json.dump(recs, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Launch the 2 ranks once; returns the work directory with every case's results."""
    work = tmp_path_factory.mktemp("fsdp")
    data = write_tokens(work / "tokens.bin")
    (work / "cli.json").write_text(plan_for(gpus=2, grad_accum=1).to_json())
    runs = {}
    for name, (kw, tc, defer, dtype) in CASES.items():
        path = work / f"{name}.plan.json"
        path.write_text(plan_for(gpus=2, **kw).to_json())
        runs[name] = {"plan": str(path), "train": _tc_dict(tc), "defer": defer, "dtype": dtype}
    base = ["train", "--plan", str(work / "cli.json"), "--data", data, "--steps", str(STEPS), "--cpu", "--quiet",
            "--lr", str(TC.lr), "--min-lr", str(TC.min_lr), "--warmup", str(TC.warmup), "--clip", "100",
            "--weight-decay", "0.1"]
    cli = [base + ["--ckpt-dir", str(work / "ck"), "--metrics", str(work / "cli.jsonl"),
                   "--summary", str(work / "cli.summary.json")],
           base + ["--ckpt-dir", str(work / "ck2"), "--metrics", str(work / "resumed.jsonl"), "--stop-after", "2"],
           base + ["--ckpt-dir", str(work / "ck2"), "--metrics", str(work / "resumed.jsonl"), "--resume"]]
    (work / "spec.json").write_text(json.dumps({"cli": cli, "runs": runs, "data": data}))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.abspath(__file__), str(work)], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


# -- the references -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def runtime_full(data: str, tc: TrainConfig, grad_accum: int):
    """The BCD runtime's single-GPU full method, 1 rank, grad_accum micro-batches: (losses, final weights)."""
    losses, _, final, _ = train(plan_for(gpus=1, grad_accum=grad_accum), data, tc)
    return losses, final


def initial(cfg) -> dict:
    from runtime.hf import hf_state_from_layers
    from runtime.model import random_layers
    model = LlamaModel(cfg)
    with torch.no_grad():
        for i, layer in random_layers(cfg, seed=0):
            for (_, p), (_, q) in zip(model.layers[i].named_parameters(remove_duplicate=False),
                                      layer.named_parameters(remove_duplicate=False)):
                p.copy_(q)
    return {k: v.clone() for k, v in hf_state_from_layers(model.layers, cfg).items()}


@functools.lru_cache(maxsize=None)
def plain(cfg, data_path: str, tc: TrainConfig, steps: int, groups: tuple[tuple[int, ...], ...]):
    """The textbook loop over one global batch of sum(len(g) for g in groups) micro-batches per step: each
    micro-batch's gradient of loss / K on its own, summed within each group in order, then the groups in order
    (the association under test); loss summed by rank (contiguous pairs), as the ranks report it. Returns
    (losses, grad norms, final weights, the first step's summed gradient by HF name)."""
    from runtime.hf import hf_state_from_layers, load_layers_from_hf_state
    model = LlamaModel(cfg)
    load_layers_from_hf_state(model.layers, initial(cfg), cfg)
    params = list(model.parameters())
    a = tc.adamw
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(a.beta1, a.beta2), eps=a.eps, weight_decay=a.weight_decay)
    data = TokenData.open(data_path, seq_len=SEQ, seed=0)
    k = sum(len(g) for g in groups)
    losses, norms, first = [], [], None
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = reference_lr(s, tc)
        grads, ls = [], []
        for x, y in [data.next_batch(MB) for _ in range(k)]:
            for p in params:
                p.grad = None
            loss = model(x, y) / k
            loss.backward()
            grads.append([p.grad.clone() for p in params])
            ls.append(loss.detach())
        summed = None
        for g in groups:
            part = [t.clone() for t in grads[g[0]]]
            for j in g[1:]:
                part = [u + v for u, v in zip(part, grads[j])]
            summed = part if summed is None else [u + v for u, v in zip(summed, part)]
        for p, t in zip(params, summed):
            p.grad = t
        half = k // 2
        losses.append(((sum(ls[:half], torch.zeros(())) + sum(ls[half:], torch.zeros(())))).item())
        if first is None:   # parameters() and the HF names walk the layers in the same order
            first = {n: t.clone() for n, t in zip(hf_state_from_layers(model.layers, cfg), summed)}
        norm = torch.nn.utils.clip_grad_norm_(params, a.clip)
        norms.append(norm.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, norms, dict(hf_state_from_layers(model.layers, cfg)), first


def _results(work, name):
    from safetensors.torch import load_file
    recs = json.loads((work / f"{name}.json").read_text())
    return [r["loss"] for r in recs], [r["grad_norm"] for r in recs], load_file(str(work / f"{name}.safetensors"))


def _norms_agree(norms: list[float], ref: list[float]) -> bool:
    """Two fp32 2-norms of the same P gradient elements in different orders: each within gamma_P / 2 + 2u of
    the exact norm (module docstring), so within gamma_P + 4u of each other, relative."""
    p = sum(t.numel() for t in initial(TINY).values())
    gamma = p * U / (1 - p * U)
    return all(abs(a - b) <= (gamma + 4 * U) * b for a, b in zip(norms, ref, strict=True))


def _equal(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# -- the tests ------------------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_two_ranks_equal_one_rank_runtime_bitwise_through_the_cli(ranks):
    """`blockfit train` under torchrun, 2 ranks x 1 micro-batch of 2, vs the runtime's full method on 1 rank
    accumulating 2 micro-batches of 2, and the plain loop: losses and weights bitwise; the checkpoint holds the
    weights under HF names once and the AdamW moments."""
    from safetensors.torch import load_file
    data = str(ranks / "tokens.bin")
    losses, final = runtime_full(data, TC, grad_accum=2)
    recs = [json.loads(line) for line in (ranks / "cli.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs] == losses
    assert all(r["ranks"] == 2 and r["grad_norm"] < 100 for r in recs)   # the clip never bit: coefficient 1.0
    ck = ranks / "ck" / "step-000003"
    weights = load_file(str(ck / "model.safetensors"))
    assert _equal(weights, final) == []
    ref_losses, ref_norms, ref_final, _ = plain(TINY, data, TC, STEPS, ((0,), (1,)))
    assert ref_losses == losses and _equal(ref_final, final) == []
    assert _norms_agree([r["grad_norm"] for r in recs], ref_norms)
    assert any(not torch.equal(final[k], v) for k, v in initial(TINY).items())   # training moved the weights
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert set(opt) == {f"{m}/{k}" for k in weights for m in ("exp_avg", "exp_avg_sq")}
    meta = json.loads((ck / "meta.json").read_text())["meta"]
    assert meta["optimizer"]["step"] == STEPS and meta["ranks"] == 2 and meta["data"]["position"] == 2 * MB * STEPS
    assert json.loads((ranks / "cli.summary.json").read_text())["cpu_offload"] is False


@pytest.mark.timeout(300)
def test_resume_continues_bitwise(ranks):
    """2 steps, a checkpoint, then --resume to step 3: the same losses and weights as the uninterrupted run."""
    from safetensors.torch import load_file
    whole = [json.loads(line)["loss"] for line in (ranks / "cli.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["loss"] for line in (ranks / "resumed.jsonl").read_text().splitlines()]
    assert resumed == whole
    a = load_file(str(ranks / "ck" / "step-000003" / "model.safetensors"))
    b = load_file(str(ranks / "ck2" / "step-000003" / "model.safetensors"))
    assert _equal(a, b) == []
    assert sorted(os.listdir(ranks / "ck2")) == ["latest", "step-000002", "step-000003"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,groups", [("micro", ((0, 2), (1, 3))), ("deferred", ((0, 1), (2, 3))),
                                         ("offload", ((0, 2), (1, 3)))])
def test_accumulation_orders_bitwise(ranks, name, groups):
    """2 ranks x 2 micro-batches: bitwise equal to the plain loop summing in FSDP2's association (module
    docstring); CPUOffloadPolicy (state on the host) with recomputed activations changes nothing."""
    losses, norms, weights = _results(ranks, name)
    ref_losses, ref_norms, ref_final, _ = plain(TINY, str(ranks / "tokens.bin"), TC, STEPS, groups)
    assert losses == ref_losses
    assert max(norms) < 100
    assert _norms_agree(norms, ref_norms)
    assert _equal(weights, ref_final) == []


@pytest.mark.timeout(300)
def test_tied_embeddings_bitwise(ranks):
    losses, _, weights = _results(ranks, "tied")
    ref_losses, _, ref_final, _ = plain(TIED, str(ranks / "tokens.bin"), TC, STEPS, ((0,), (1,)))
    assert "lm_head.weight" not in weights
    assert losses == ref_losses and _equal(weights, ref_final) == []


@pytest.mark.timeout(300)
def test_active_clip_within_the_norm_order_bound(ranks):
    """One step with the clip active: the norm and every weight within the bound derived in the module docstring."""
    losses, norms, weights = _results(ranks, "clipped")
    ref_losses, ref_norms, ref_final, grad = plain(TINY, str(ranks / "tokens.bin"), CLIPPED, 1, ((0,), (1,)))
    assert losses == ref_losses
    p = sum(t.numel() for t in grad.values())
    gamma = p * U / (1 - p * U)
    exact = math.sqrt(sum(float((t.double() ** 2).sum()) for t in grad.values()))
    assert exact > 2 * CLIPPED.adamw.clip                               # the clip does bite
    assert abs(norms[0] - exact) <= (gamma / 2 + 2 * U) * exact
    delta = gamma + 8 * U
    c = CLIPPED.adamw.clip / (exact + 1e-6)
    lr, eps = reference_lr(0, CLIPPED), CLIPPED.adamw.eps
    worst = 0.0
    for name, g in grad.items():
        x = (c * g.double()).abs()
        bound = lr * (delta * torch.clamp(eps / x, max=1.0) + 16 * U) + 2 * U * ref_final[name].double().abs()
        diff = (weights[name].double() - ref_final[name].double()).abs()
        assert bool((diff <= bound).all()), name
        worst = max(worst, float(diff.max()))
    assert worst < 1e-6


@pytest.mark.timeout(300)
def test_bf16_compute_runs_and_rounds(ranks):
    """param_dtype bf16 on the CPU: the all-gathered weights are bf16 (the losses differ from fp32's) while the
    master stays fp32, so training tracks the fp32 run to bf16's resolution (2^-8 relative)."""
    losses, _, weights = _results(ranks, "bf16")
    fp32, _, _, _ = plain(TINY, str(ranks / "tokens.bin"), TC, STEPS, ((0,), (1,)))
    assert losses != fp32
    assert max(abs(a - b) / b for a, b in zip(losses, fp32)) < 2 ** -6
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    """A BCD plan handed to the FSDP2 path, NVMe placements, a 2-GPU full plan without torchrun, and flags this
    path does not run: exit 2 with one paragraph, before any process group exists."""
    from runtime.dist import World
    from runtime.fsdp import check_plan
    from tools.cli import run as cli
    with pytest.raises(UserError, match="method is 'bcd'"):
        check_plan(plan_for(gpus=2, grad_accum=1, method="bcd"), World(size=2, local_size=2))
    with pytest.raises(UserError, match="offloads to host memory only"):
        check_plan(plan_for(gpus=2, grad_accum=1, state="nvme"), World(size=2, local_size=2))
    data = write_tokens(tmp_path / "tokens.bin")
    path = tmp_path / "p.json"
    path.write_text(plan_for(gpus=2, grad_accum=1).to_json())
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    for env, flags, message in [({}, [], "plan is for 2 GPU"),
                                (torchrun, ["--trace", str(tmp_path / "t.json")], "--trace is not supported"),
                                (torchrun, ["--resume"], "--resume needs a checkpoint")]:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            code = cli(["train", "--plan", str(path), "--data", data, "--cpu", "--quiet", *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
    import torch.distributed as dist
    assert not dist.is_initialized()


if __name__ == "__main__":
    _worker(sys.argv[1])
