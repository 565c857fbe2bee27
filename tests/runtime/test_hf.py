"""runtime/hf.py: our decoder and transformers' compute the same loss on the same weights, both ways round, and
a Blockfit checkpoint with config.json loads in transformers.AutoModelForCausalLM unchanged."""
from __future__ import annotations

import json
import os

import pytest
import torch

from planner.errors import UserError
from planner.llama import LlamaModel, init_weights
from planner.models import ModelConfig, load_model_config
from runtime.checkpoint import load_checkpoint, save_checkpoint, write_hf_config
from runtime.hf import (
    build_hf_model,
    hf_config_dict,
    hf_state_from_layers,
    load_layers_from_hf_state,
    read_safetensors_dir,
)

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(name="tiny-test", hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, vocab=256, max_seq=64,
                   rope_theta=500000.0, norm_eps=1e-6)
VARIANTS = {"llama": TINY,
            "qwen2-bias": ModelConfig(**{**TINY.to_dict(), "arch": "qwen2", "attention_bias": True}),
            "mistral-tied": ModelConfig(**{**TINY.to_dict(), "arch": "mistral", "tie_embeddings": True})}


def _ours(cfg: ModelConfig, seed: int) -> LlamaModel:
    model = LlamaModel(cfg)
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        init_weights(layer, std=0.05, generator=g)
        for p in layer.parameters():  # norms and biases away from 1 and 0, so a mix-up shows in the loss
            if p.dim() == 1:
                p.data.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


def _hf_loss(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()  # HF shifts the labels itself


def _our_loss(model: LlamaModel, x: torch.Tensor) -> float:
    with torch.no_grad():
        return model(x[:, :-1], x[:, 1:]).item()  # our Head takes labels already shifted


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_loss_both_ways_and_through_a_checkpoint(tmp_path, variant):
    cfg = VARIANTS[variant]
    x = _tokens()

    torch.manual_seed(0)
    hf = build_hf_model(cfg).eval()
    assert type(hf).__name__ == hf_config_dict(cfg)["architectures"][0]
    ours = _ours(cfg, seed=1)
    before = _our_loss(ours, x)
    load_layers_from_hf_state(ours.layers, hf.state_dict(), cfg)  # HF -> ours
    assert abs(_our_loss(ours, x) - before) > 1e-3  # the copy really changed our weights
    assert abs(_our_loss(ours, x) - _hf_loss(hf, x)) < 1e-5

    ours = _ours(cfg, seed=2)  # ours -> HF: every HF parameter comes from us
    sd = hf_state_from_layers(ours.layers, cfg)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    want = _our_loss(ours, x)
    assert abs(_hf_loss(hf, x) - want) < 1e-5

    path = save_checkpoint(str(tmp_path), 7, weights=sd, optimizer={}, meta={})
    write_hf_config(path, cfg)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert next(loaded.parameters()).dtype == torch.float32
    assert abs(_hf_loss(loaded, x) - want) < 1e-5
    same = load_model_config(path)  # our own reader of config.json gets the same shape back
    assert same.fingerprint() == cfg.fingerprint()

    fresh = _ours(cfg, seed=3)  # and a Blockfit resume from that checkpoint is bitwise the model we saved
    load_layers_from_hf_state(fresh.layers, load_checkpoint(path).weights, cfg)
    assert _our_loss(fresh, x) == want


def test_mismatched_weights_are_refused_before_any_copy():
    cfg = TINY
    sd = {k: v.clone() for k, v in hf_state_from_layers(_ours(cfg, seed=4).layers, cfg).items()}
    target = _ours(cfg, seed=5)
    untouched = {k: v.clone() for k, v in hf_state_from_layers(target.layers, cfg).items()}

    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old checkpoints carry it: ignored
    with pytest.raises(UserError) as e:
        load_layers_from_hf_state(target.layers, sd, cfg)
    msg = str(e.value)
    assert "missing 1 tensor(s): model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight (3, 64) (expected (32, 64))" in msg
    assert "no place for: model.layers.2.mlp.up_proj.weight" in msg and "inv_freq" not in msg
    after = hf_state_from_layers(target.layers, cfg)
    assert all(torch.equal(after[k], untouched[k]) for k in untouched)


def test_sharded_and_single_safetensors_dirs(tmp_path):
    from safetensors.torch import save_file
    sd = hf_state_from_layers(_ours(TINY, seed=6).layers, TINY)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:7], "model-00002-of-00002.safetensors": names[7:]}
    for shard, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = read_safetensors_dir(str(tmp_path))
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)

    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="no shard holds: model.extra.weight"):
        read_safetensors_dir(str(tmp_path))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors' does not exist"):
        read_safetensors_dir(str(tmp_path))

    single = tmp_path / "single"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(single / "model.safetensors"))
    assert read_safetensors_dir(str(single)).keys() == sd.keys()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds neither"):
        read_safetensors_dir(str(tmp_path / "empty"))


def test_configs_without_an_hf_equivalent_are_refused():
    with pytest.raises(UserError, match="no Hugging Face equivalent"):
        hf_config_dict(ModelConfig(**{**TINY.to_dict(), "attention_bias": True}))
    with pytest.raises(UserError, match="no Hugging Face equivalent"):
        hf_config_dict(ModelConfig(**{**TINY.to_dict(), "arch": "qwen2"}))
