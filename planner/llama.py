"""The built-in Llama-architecture decoder, cut into the layers that BCD trains one block at a time.

Same math as Hugging Face's LlamaForCausalLM (RMSNorm in fp32, rotate-half RoPE, SwiGLU, GQA, causal SDPA),
so weights load across with the same names. `model.layers` is the flat list the planner and the runtime index:
layer 0 is the embedding, 1..n the decoder layers, n+1 the final norm, head and loss.

Build it on the meta device for profiling (no memory): `with torch.device("meta"): build_model(cfg)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.models import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope(seq: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(seq, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. On meta, SDPA would decompose into the math path and save the s x s probabilities;
    real CPUs and GPUs run a flash kernel that saves only q, k, v, out and the log-sum-exp, so the profile runs
    the CPU flash op, which has a meta kernel and saves exactly what the real kernels save."""
    if q.device.type == "meta":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # An explicit empty weight skips nn.Embedding's own normal_ init (on meta it would import dynamo, ~1 s);
        # init_weights() initialises every layer once it is materialised.
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, _weight=torch.empty(cfg.vocab, cfg.hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hd = cfg.hidden, cfg.head_dim
        self.cfg = cfg
        self.input_layernorm = RMSNorm(h, cfg.norm_eps)
        self.q_proj = nn.Linear(h, cfg.heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.heads * hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.norm_eps)
        self.gate_proj = nn.Linear(h, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(h, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        hd = cfg.head_dim
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, s, cfg.heads, hd).transpose(1, 2)
        k = self.k_proj(y).view(b, s, cfg.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(y).view(b, s, cfg.kv_heads, hd).transpose(1, 2)
        cos, sin = rope(s, hd, cfg.rope_theta, x.device, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cfg.kv_heads != cfg.heads:
            rep = cfg.heads // cfg.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        a = attention(q, k, v)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, cfg.heads * hd))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Head(nn.Module):
    """Final norm, lm_head and the next-token cross-entropy (logits in fp32 for the loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([Embedding(cfg)] + [DecoderLayer(cfg) for _ in range(cfg.layers)]
                                    + [Head(cfg)])
        if cfg.tie_embeddings:
            self.layers[-1].lm_head.weight = self.layers[0].embed_tokens.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](tokens)
        for layer in self.layers[1:-1]:
            x = layer(x)
        return self.layers[-1](x, labels)


def build_model(cfg: ModelConfig) -> LlamaModel:
    """Construct on the current default device (meta for profiling, cpu to materialise)."""
    return LlamaModel(cfg)


def init_weights(layer: nn.Module, *, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Random initialisation of one layer in place (norms to one), as HF's _init_weights does."""
    with torch.no_grad():
        for mod in layer.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, std, generator=generator)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, std, generator=generator)


def hf_name(layer_index: int, n_layers: int, local: str) -> str:
    """Map (layer index, parameter name inside our layer) to Hugging Face's LlamaForCausalLM name."""
    if layer_index == 0:
        return "model." + local
    if layer_index == n_layers + 1:
        return ("model." + local) if local.startswith("norm.") else local
    sub = "self_attn." if local.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj") else (
        "mlp." if local.split(".")[0] in ("gate_proj", "up_proj", "down_proj") else "")
    return f"model.layers.{layer_index - 1}.{sub}{local}"
