"""Model configs: a catalog of named Llama-family shapes, and offline loading of a Hugging Face config.json.

Parameter counts of the catalog entries equal the real checkpoints' (see tests/planner/test_models.py and
../shared/reference/hardware.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

from planner.errors import UserError, closest, read_json


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str                      # catalog name or the config file's path
    hidden: int                    # model width h
    layers: int                    # decoder layers
    heads: int                     # attention heads
    kv_heads: int                  # key/value heads (GQA when < heads)
    ffn: int                       # SwiGLU intermediate width
    vocab: int                     # vocabulary size
    rope_theta: float = 10000.0    # RoPE base
    norm_eps: float = 1e-5         # RMSNorm epsilon
    attention_bias: bool = False   # q/k/v projections carry a bias (Qwen2)
    tie_embeddings: bool = False   # lm_head shares the embedding matrix
    max_seq: int = 4096            # longest sequence the config allows
    arch: str = "llama"            # llama | mistral | qwen2: same math here

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the weights; a plan for another model will not load."""
        shape = dataclasses.asdict(self)
        shape.pop("name")
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        cfg = cls(**d)
        check_model_config(cfg)
        return cfg


# Bounds on a config's sizes, checked before anything is built: wide enough for every real model (the largest
# open models have hidden 16384-25600, 126 layers, 256k vocabularies, 128k-1M positions), narrow enough that a
# typo cannot make the profiler allocate for hours or overflow a storage size.
LIMITS = {"hidden": 1 << 16, "layers": 1024, "heads": 1024, "kv_heads": 1024, "ffn": 1 << 18, "vocab": 1 << 22,
          "max_seq": 1 << 24}


def check_model_config(cfg: "ModelConfig", where: str = "model config") -> None:
    """One validator for a model's shape, wherever it comes from (a config.json, a plan file): positive integer
    sizes within LIMITS, heads dividing hidden and kv_heads dividing heads, finite positive rope_theta and norm
    eps, real booleans, a known architecture. Raises UserError naming the field."""
    def bad(msg: str):
        raise UserError(f"{where}: {msg}.")
    for name, hi in LIMITS.items():
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= hi:
            bad(f"'{name}' must be an integer from 1 to {hi}, got {v!r}")
    if cfg.hidden % cfg.heads:
        bad(f"hidden ({cfg.hidden}) is not a multiple of heads ({cfg.heads})")
    if cfg.heads % cfg.kv_heads:
        bad(f"kv_heads ({cfg.kv_heads}) does not divide heads ({cfg.heads})")
    if (cfg.hidden // cfg.heads) % 2:
        bad(f"the head dimension hidden / heads = {cfg.hidden // cfg.heads} is odd; rotary embeddings need it even")
    for name in ("rope_theta", "norm_eps"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            bad(f"'{name}' must be a finite positive number, got {v!r}")
    for name in ("attention_bias", "tie_embeddings"):
        if not isinstance(getattr(cfg, name), bool):
            bad(f"'{name}' must be true or false, got {getattr(cfg, name)!r}")
    if cfg.arch not in _SUPPORTED_ARCH.values():
        bad(f"arch '{cfg.arch}' is not one of {', '.join(sorted(set(_SUPPORTED_ARCH.values())))}")
    if not isinstance(cfg.name, str):
        bad(f"name must be a string, got {cfg.name!r}")


# Shapes of the real checkpoints (hardware.md, "Models").
CATALOG: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny", hidden=64, layers=4, heads=4, kv_heads=2, ffn=176, vocab=256,
                        max_seq=512),
    "1b": ModelConfig(name="1b", hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000,
                      max_seq=2048),  # TinyLlama-1.1B
    "7b": ModelConfig(name="7b", hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "8b": ModelConfig(name="8b", hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256,
                      rope_theta=500000.0, max_seq=8192),  # Llama-3-8B
    "13b": ModelConfig(name="13b", hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824, vocab=32000),
    "70b": ModelConfig(name="70b", hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=32000),
}

# Real parameter counts, for tests and for the user's peace of mind.
REFERENCE_PARAMS = {
    "1b": 1_100_048_384, "7b": 6_738_415_616, "8b": 8_030_261_248,
    "13b": 13_015_864_320, "70b": 68_976_648_192,
}

_SUPPORTED_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def load_model_config(spec: str) -> ModelConfig:
    """A catalog name, a config.json path, or a directory holding config.json (a local HF checkpoint)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"--model is empty; give a catalog name ({', '.join(CATALOG)}) or a config.json path.")
    if spec in CATALOG:
        return CATALOG[spec]
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not (spec.endswith(".json") or os.path.isdir(spec)):
        raise UserError(f"unknown model '{spec}'. Known models: {', '.join(CATALOG)}"
                        f"{closest(spec, CATALOG)}; or give a path to a Hugging Face config.json.")
    return _from_hf_config(path)


def _rope_theta(raw: dict) -> float:
    """transformers 5 nests the RoPE base in rope_parameters; 4.x has rope_theta at the top."""
    nested = raw.get("rope_parameters")
    if isinstance(nested, dict) and "rope_theta" in nested:
        return nested["rope_theta"]
    return 10000.0


def _from_hf_config(path: str) -> ModelConfig:
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise UserError(f"model config '{path}' must hold a JSON object.")
    archs = raw.get("architectures") or ["LlamaForCausalLM"]
    ok = isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)
    arch = _SUPPORTED_ARCH.get(archs[0]) if ok else None
    if arch is None:
        raise UserError(f"model config '{path}': field 'architectures' is {archs!r}; supported: "
                        f"{', '.join(_SUPPORTED_ARCH)}.")

    def field(key: str, default=None, kind=int):
        v = raw.get(key, default)
        if v is None:
            raise UserError(f"model config '{path}': field '{key}' is missing.")
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise UserError(f"model config '{path}': field '{key}' must be a positive integer, got {v!r}.")
        if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                              or v <= 0):
            raise UserError(f"model config '{path}': field '{key}' must be a positive number (finite), got {v!r}.")
        if kind is bool and not isinstance(v, bool):
            raise UserError(f"model config '{path}': field '{key}' must be true or false, got {v!r}.")
        return v

    for key, hi in (("hidden_size", LIMITS["hidden"]), ("num_hidden_layers", LIMITS["layers"]),
                    ("num_attention_heads", LIMITS["heads"]), ("num_key_value_heads", LIMITS["kv_heads"]),
                    ("intermediate_size", LIMITS["ffn"]), ("vocab_size", LIMITS["vocab"]),
                    ("max_position_embeddings", LIMITS["max_seq"])):
        v = raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > hi:
            raise UserError(f"model config '{path}': field '{key}' = {v} is beyond what Blockfit plans for "
                            f"(at most {hi}); check the file.")

    hidden = field("hidden_size")
    heads = field("num_attention_heads")
    kv = field("num_key_value_heads", heads)
    if hidden % heads:
        raise UserError(f"model config '{path}': field 'hidden_size' ({hidden}) is not a multiple of "
                        f"'num_attention_heads' ({heads}).")
    if heads % kv:
        raise UserError(f"model config '{path}': field 'num_key_value_heads' ({kv}) does not divide "
                        f"'num_attention_heads' ({heads}).")
    if raw.get("head_dim") not in (None, hidden // heads):
        raise UserError(f"model config '{path}': field 'head_dim' ({raw['head_dim']}) differs from "
                        f"hidden_size / num_attention_heads; not supported.")
    cfg = ModelConfig(
        name=path, hidden=hidden, layers=field("num_hidden_layers"), heads=heads, kv_heads=kv,
        ffn=field("intermediate_size"), vocab=field("vocab_size"),
        rope_theta=float(field("rope_theta", _rope_theta(raw), float)),
        norm_eps=float(field("rms_norm_eps", 1e-5, float)),
        attention_bias=field("attention_bias", arch == "qwen2", bool),
        tie_embeddings=field("tie_word_embeddings", False, bool),
        max_seq=field("max_position_embeddings", 4096), arch=arch)
    check_model_config(cfg, f"model config '{path}'")
    return cfg
