"""planner/models.py: catalog parameter counts against the real checkpoints, offline loading of a Hugging Face
config.json (and its errors), and the shape fingerprint."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from planner.errors import UserError
from planner.llama import build_model
from planner.models import CATALOG, REFERENCE_PARAMS, ModelConfig, load_model_config
from planner.profile import profile_model


def _meta_params(cfg: ModelConfig) -> int:
    # parameters() yields a shared (tied) matrix once, as a checkpoint stores it once
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_catalog_parameter_counts_equal_the_real_checkpoints(name):
    cfg = CATALOG[name]
    assert profile_model(cfg).total_params == REFERENCE_PARAMS[name]
    assert _meta_params(cfg) == REFERENCE_PARAMS[name]


def test_every_catalog_model_has_a_reference_count_or_is_the_toy():
    assert set(CATALOG) - set(REFERENCE_PARAMS) == {"tiny"}
    # the toy has no checkpoint; its profile and its module still agree
    assert profile_model(CATALOG["tiny"]).total_params == _meta_params(CATALOG["tiny"]) == 217_664


def test_tied_embeddings_and_qkv_bias_are_counted_once():
    # Qwen2-0.5B's shape (tied head, q/k/v bias): 494,032,768 parameters, by hand from the shapes:
    # 151936*896 (embedding, shared with the head) + 24 * (896*896+896 + 2*(896*128+128) + 896*896
    # + 3*896*4864 + 2*896) + 896 (final norm).
    cfg = ModelConfig(name="qwen2-0.5b", hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936,
                      attention_bias=True, tie_embeddings=True, arch="qwen2")
    assert _meta_params(cfg) == 494_032_768
    small = dataclasses.replace(cfg, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=300)
    untied = dataclasses.replace(small, tie_embeddings=False)
    assert profile_model(small, cache=False).total_params == _meta_params(small)
    assert _meta_params(untied) - _meta_params(small) == 300 * 64


def _write(tmp_path, raw, name="config.json"):
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return str(path)


LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": 32000,
             "tie_word_embeddings": False, "torch_dtype": "float16", "model_type": "llama"}
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
              "sliding_window": None, "vocab_size": 32768, "tie_word_embeddings": False}
QWEN2_05B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
             "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
             "vocab_size": 151936, "tie_word_embeddings": True, "use_sliding_window": False}


def test_llama_config_json_gives_the_catalog_shape(tmp_path):
    path = _write(tmp_path, LLAMA2_7B)
    cfg = load_model_config(path)
    assert cfg.name == path and cfg.arch == "llama"
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.ffn, cfg.vocab) == (4096, 32, 32, 32, 11008, 32000)
    assert cfg.rope_theta == 10000.0 and cfg.norm_eps == 1e-5 and cfg.max_seq == 4096
    assert not cfg.attention_bias and not cfg.tie_embeddings
    # the same shape as the catalog's 7b: the same fingerprint, so the same plans and profiles apply
    assert cfg.fingerprint() == CATALOG["7b"].fingerprint()


def test_mistral_config_reads_gqa_and_rope_theta(tmp_path):
    cfg = load_model_config(_write(tmp_path, MISTRAL_7B))
    assert cfg.arch == "mistral"
    assert (cfg.heads, cfg.kv_heads, cfg.ffn, cfg.vocab, cfg.max_seq) == (32, 8, 14336, 32768, 32768)
    assert cfg.rope_theta == 1_000_000.0 and isinstance(cfg.rope_theta, float)
    assert not cfg.attention_bias and not cfg.tie_embeddings


def test_qwen2_config_has_bias_and_tied_head(tmp_path):
    cfg = load_model_config(_write(tmp_path, QWEN2_05B))
    assert cfg.arch == "qwen2" and cfg.attention_bias and cfg.tie_embeddings
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim) == (896, 24, 14, 2, 64)
    assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 1_000_000.0
    untied = load_model_config(_write(tmp_path, dict(QWEN2_05B, tie_word_embeddings=False), "untied.json"))
    assert not untied.tie_embeddings and untied.fingerprint() != cfg.fingerprint()


def test_a_checkpoint_directory_is_read_through_its_config_json(tmp_path):
    _write(tmp_path, MISTRAL_7B)
    cfg = load_model_config(str(tmp_path))
    assert cfg.name == str(tmp_path / "config.json")
    assert cfg == load_model_config(str(tmp_path / "config.json"))
    assert cfg.kv_heads == 8


def test_catalog_names_and_unknown_names():
    assert load_model_config("8b") is CATALOG["8b"]
    with pytest.raises(UserError, match=r"unknown model '8B-instruct'.*Known models: tiny, 1b"):
        load_model_config("8B-instruct")


BAD = [
    ("missing hidden_size", {k: v for k, v in LLAMA2_7B.items() if k != "hidden_size"},
     r"field 'hidden_size' is missing"),
    ("negative layers", dict(LLAMA2_7B, num_hidden_layers=-2),
     r"field 'num_hidden_layers' must be a positive integer, got -2"),
    ("string vocab", dict(LLAMA2_7B, vocab_size="32000"), r"field 'vocab_size' must be a positive integer"),
    ("bool layers", dict(LLAMA2_7B, num_hidden_layers=True), r"field 'num_hidden_layers' must be a positive"),
    ("float hidden", dict(LLAMA2_7B, hidden_size=4096.0), r"field 'hidden_size' must be a positive integer"),
    ("heads not dividing hidden", dict(LLAMA2_7B, num_attention_heads=30),
     r"field 'hidden_size' \(4096\) is not a multiple of 'num_attention_heads' \(30\)"),
    ("kv not dividing heads", dict(LLAMA2_7B, num_key_value_heads=5), r"field 'num_key_value_heads' \(5\)"),
    ("odd head_dim", dict(LLAMA2_7B, head_dim=64), r"field 'head_dim' \(64\)"),
    ("zero rope_theta", dict(LLAMA2_7B, rope_theta=0), r"field 'rope_theta' must be a positive number"),
    ("unknown architecture", dict(LLAMA2_7B, architectures=["GPT2LMHeadModel"]),
     r"field 'architectures' is \['GPT2LMHeadModel'\]; supported: LlamaForCausalLM"),
    ("architecture not a list", dict(LLAMA2_7B, architectures="LlamaForCausalLM"), r"field 'architectures'"),
]


@pytest.mark.parametrize("raw, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_configs_name_the_file_and_the_field(tmp_path, raw, message):
    path = _write(tmp_path, raw)
    with pytest.raises(UserError, match=message) as e:
        load_model_config(path)
    assert f"model config '{path}'" in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"hidden_size": 64,', r"is not readable JSON"),
    ("\xff\xfe not utf8", r"is not readable JSON"),
    ('[{"hidden_size": 64}]', r"must hold a JSON object"),
    ('"LlamaForCausalLM"', r"must hold a JSON object"),
], ids=["truncated", "binary", "list", "string"])
def test_unreadable_configs_name_the_file(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=message) as e:
        load_model_config(str(path))
    assert str(path) in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        load_model_config(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match=r"does not exist") as e:
        load_model_config(str(tmp_path))  # a directory without config.json
    assert "config.json" in str(e.value)


SHAPE_CHANGES = dict(hidden=128, layers=5, heads=8, kv_heads=4, ffn=192, vocab=512, rope_theta=500000.0,
                     norm_eps=1e-6, attention_bias=True, tie_embeddings=True)


@pytest.mark.parametrize("field, value", sorted(SHAPE_CHANGES.items()))
def test_fingerprint_changes_with_every_shape_field(field, value):
    base = CATALOG["tiny"]
    assert getattr(base, field) != value
    assert dataclasses.replace(base, **{field: value}).fingerprint() != base.fingerprint()


def test_fingerprint_ignores_the_name_and_is_stable():
    base = CATALOG["tiny"]
    renamed = dataclasses.replace(base, name="/models/my-tiny/config.json")
    assert renamed.fingerprint() == base.fingerprint()
    assert len(base.fingerprint()) == 16 and int(base.fingerprint(), 16) >= 0
    # a round trip through a dict (as in a plan file) keeps it
    assert ModelConfig.from_dict(json.loads(json.dumps(base.to_dict()))).fingerprint() == base.fingerprint()
    assert len({c.fingerprint() for c in CATALOG.values()}) == len(CATALOG)
