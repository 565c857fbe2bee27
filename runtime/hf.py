"""Hugging Face interop, offline: our flat layer list <-> HF tensor names, safetensors directories, HF configs.

planner.llama computes exactly what LlamaForCausalLM computes and names its parameters so that
planner.llama.hf_name maps them one to one; this file is the only place that walks that mapping. transformers is
an optional dependency, imported only by build_hf_model.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from planner.errors import UserError
from planner.llama import hf_name
from planner.models import ModelConfig

_HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed, never trained


def source_name(cfg: ModelConfig, layer_index: int, local: str) -> str:
    """The Hugging Face name a parameter is stored under: a tied lm_head is the embedding (HF saves it once)."""
    name = hf_name(layer_index, cfg.layers, local)
    return "model.embed_tokens.weight" if cfg.tie_embeddings and name == "lm_head.weight" else name


def _named(model_layers, cfg: ModelConfig):
    """(HF name, parameter) for every parameter, the tied lm_head once (as the embedding), never twice."""
    if len(model_layers) != cfg.layers + 2:
        raise ValueError(f"expected {cfg.layers + 2} layers (embedding, {cfg.layers} decoder layers, head), "
                         f"got {len(model_layers)}")
    for i, layer in enumerate(model_layers):
        for local, p in layer.named_parameters():
            name = hf_name(i, cfg.layers, local)
            if source_name(cfg, i, local) == name:
                yield name, p


def hf_state_from_layers(model_layers, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (detached, not copied). A tied lm_head is left out, as HF does."""
    return {name: p.detach() for name, p in _named(model_layers, cfg)}


def load_layers_from_hf_state(model_layers, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Copy an HF state dict into our layers in place (casting dtype). Everything is checked before anything is
    copied, so a mismatch leaves the model as it was and raises a UserError listing what does not fit."""
    params = dict(_named(model_layers, cfg))
    missing = [n for n in params if n not in sd]
    wrong = [f"{n} {tuple(sd[n].shape)} (expected {tuple(p.shape)})"
             for n, p in params.items() if n in sd and tuple(sd[n].shape) != tuple(p.shape)]
    tied_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in sd if n not in params and n not in tied_extra and not n.endswith(_IGNORED_SUFFIXES)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_few(wrong)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) this model has no place for: {_few(unexpected)}")
    if problems:
        raise UserError(f"the weights do not fit model '{cfg.name}': {'; '.join(problems)}. Check that the "
                        f"model config matches the checkpoint.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name])


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a directory with model.safetensors or a sharded index."""
    if os.path.isfile(path):
        return _load(path)
    if not os.path.isdir(path):
        raise UserError(f"weights '{path}' do not exist.")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"weights index '{index}' is unreadable or has no weight_map ({e}).") from None
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(_load(os.path.join(path, shard)))
        absent = [n for n in weight_map if n not in sd]
        if absent:
            raise UserError(f"weights index '{index}' lists {len(absent)} tensor(s) that no shard holds: "
                            f"{_few(absent)}.")
        return sd
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return _load(single)
    raise UserError(f"weights directory '{path}' holds neither model.safetensors nor model.safetensors.index.json.")


def hf_config_dict(cfg: ModelConfig, *, dtype: str = "float32") -> dict:
    """The config.json fields transformers needs to rebuild this model with our math."""
    if cfg.arch not in _HF_ARCH:
        raise UserError(f"model '{cfg.name}' has architecture '{cfg.arch}'; Hugging Face export supports "
                        f"{', '.join(_HF_ARCH)}.")
    # Our decoder puts biases on q, k and v only. That is Qwen2's layout; Llama's attention_bias also adds an
    # o_proj bias and Qwen2 always has the q/k/v ones, so other combinations would not load identically.
    if cfg.attention_bias != (cfg.arch == "qwen2"):
        raise UserError(f"model '{cfg.name}': arch '{cfg.arch}' with attention_bias={cfg.attention_bias} has no "
                        f"Hugging Face equivalent (q/k/v biases mean arch 'qwen2', and only that).")
    d = {"architectures": [_HF_ARCH[cfg.arch]], "model_type": cfg.arch, "hidden_size": cfg.hidden,
         "intermediate_size": cfg.ffn, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
         "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab,
         "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
         "attention_bias": cfg.attention_bias, "max_position_embeddings": cfg.max_seq, "hidden_act": "silu",
         "torch_dtype": dtype}
    if cfg.arch == "mistral":
        d["sliding_window"] = None  # our attention is full causal
    if cfg.arch == "qwen2":
        d["use_sliding_window"] = False
    return d


def build_hf_model(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised transformers model of this shape (SDPA attention), built without the hub."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise UserError("Hugging Face interop needs transformers: pip install 'blockfit[transformers]'.") from None
    fields = hf_config_dict(cfg)
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key)
    config = AutoConfig.for_model(cfg.arch, **fields)
    config.architectures = [_HF_ARCH[cfg.arch]]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def _load(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise UserError(f"weights file '{path}' does not exist.") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights file '{path}' is unreadable or not safetensors ({e}).") from None


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
