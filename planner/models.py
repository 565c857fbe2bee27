"""Model configs: a catalog of named Llama-family shapes, and offline loading of a Hugging Face config.json.

Parameter counts of the catalog entries equal the real checkpoints' (see tests/planner/test_models.py and
../shared/reference/hardware.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
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
        return cls(**d)


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
    arch = _SUPPORTED_ARCH.get(archs[0]) if isinstance(archs, list) and archs else None
    if arch is None:
        raise UserError(f"model config '{path}': field 'architectures' is {archs!r}; supported: "
                        f"{', '.join(_SUPPORTED_ARCH)}.")

    def field(key: str, default=None, kind=int):
        v = raw.get(key, default)
        if v is None:
            raise UserError(f"model config '{path}': field '{key}' is missing.")
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise UserError(f"model config '{path}': field '{key}' must be a positive integer, got {v!r}.")
        if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise UserError(f"model config '{path}': field '{key}' must be a positive number, got {v!r}.")
        return v

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
    return ModelConfig(
        name=path, hidden=hidden, layers=field("num_hidden_layers"), heads=heads, kv_heads=kv,
        ffn=field("intermediate_size"), vocab=field("vocab_size"),
        rope_theta=float(field("rope_theta", _rope_theta(raw), float)),
        norm_eps=float(field("rms_norm_eps", 1e-5, float)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_seq=field("max_position_embeddings", 4096), arch=arch)
