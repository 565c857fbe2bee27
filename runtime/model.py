"""The model for a plan: built on the meta device, then materialised layer by layer straight into its tier.

The built-in decoder (planner/llama.py) is the model for a catalog name and for a local Hugging Face config.json
alike (the plan carries the ModelConfig). No layer is ever materialised whole-model: each one is initialised
(or read from a safetensors checkpoint) on the CPU, flattened, and put on the tier the plan chose, so a model
bigger than host RAM can start from NVMe. The modules keep meta-free, 0-element parameters until the runtime
binds them to a flat buffer: resident layers now, streamed layers whenever the copy engine loads them.

Tied embeddings: the head holds its own copy of the embedding matrix (the plan sizes the head with it: it must be
where the head runs), so the embedding and the head stream independently, each on the tier the plan chose. When
the matrix is trained (TiedMatrix), it is one parameter: the embedding's, trained in the embedding's block with
the gradients of both uses summed, and the head's copy is rewritten from it after every step that changed it.
"""
from __future__ import annotations

import torch
from torch import nn

from planner.llama import DecoderLayer, Embedding, Head, LlamaModel, hf_name, init_weights
from planner.models import ModelConfig
from runtime.hf import load_layers_from_hf_state, read_safetensors_dir, source_name
from runtime.store import FlatLayout, TieredStore, bind

INIT_STD = 0.02


def meta_layers(cfg: ModelConfig) -> nn.ModuleList:
    """The flat layer list (embedding, decoders, head) with no memory behind it."""
    with torch.device("meta"):
        return LlamaModel(cfg).layers


def layouts_of(layers: nn.ModuleList, align: int = 1) -> list[FlatLayout]:
    return [FlatLayout.of(layer, align) for layer in layers]


def materialise(layers: nn.ModuleList, layouts: list[FlatLayout], store: TieredStore) -> None:
    """Swap every meta parameter for a frozen 0-element device parameter, then bind the resident layers."""
    for layer in layers:
        for mod in layer.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = nn.Parameter(torch.empty(0, dtype=store.target.weight_dtype,
                                                                     device=store.target.device),
                                                         requires_grad=False)
    for i, tier in enumerate(store.tiers):
        if tier == "gpu":
            bind(layers[i], layouts[i], store.resident(i), empty=store.empty)


def _cpu_layer(cfg: ModelConfig, index: int) -> nn.Module:
    """One layer with uninitialised fp32 CPU parameters (built on meta: no default init runs)."""
    kind = Embedding if index == 0 else Head if index == cfg.layers + 1 else DecoderLayer
    with torch.device("meta"):
        layer = kind(cfg)
    for mod in layer.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(torch.empty(p.shape), requires_grad=False)
    return layer


def random_layers(cfg: ModelConfig, *, seed: int):
    """(index, layer) for every layer, initialised on the CPU in fp32, one at a time, in layer order from one
    generator: the same numbers as init_weights over a whole LlamaModel's layers with
    torch.Generator().manual_seed(seed). A tied head's lm_head takes the embedding's matrix (its own draws are
    made and dropped). The one rule for a run's random weights: the BCD runtime and runtime/fsdp.py both use it."""
    g = torch.Generator().manual_seed(seed)
    embedding = None
    for i in range(cfg.layers + 2):
        layer = _cpu_layer(cfg, i)
        init_weights(layer, std=INIT_STD, generator=g)
        if cfg.tie_embeddings and i == 0:
            embedding = layer.embed_tokens.weight.detach().clone()
        elif cfg.tie_embeddings and i == cfg.layers + 1:
            layer.lm_head.weight.data.copy_(embedding)
        yield i, layer


def init_random(cfg: ModelConfig, layouts: list[FlatLayout], store: TieredStore, *, seed: int) -> None:
    """Random weights (random_layers), flattened onto their tiers one layer at a time."""
    for i, layer in random_layers(cfg, seed=seed):
        lay = layouts[i]
        store.put(i, lay.flatten([p.detach() for p in layer.parameters()], torch.zeros(lay.numel)))
        del layer


def init_from_hf(cfg: ModelConfig, layouts: list[FlatLayout], store: TieredStore, path: str) -> None:
    """Weights from a local safetensors file or directory under Hugging Face names (runtime/hf.py's mapping).
    Every name and shape is checked on a meta copy of the model before anything is placed."""
    sd = read_safetensors_dir(path)
    load_layers_from_hf_state(meta_layers(cfg), sd, cfg)  # raises a UserError listing what does not fit
    load_state(cfg, layouts, store, sd)


def load_state(cfg: ModelConfig, layouts: list[FlatLayout], store: TieredStore, sd: dict[str, torch.Tensor]) -> None:
    """Put a state dict under Hugging Face names on the tiers (checkpoints and --init-from)."""
    for i, lay in enumerate(layouts):
        flat = torch.zeros(lay.numel, dtype=torch.float32)
        lay.flatten([sd[source_name(cfg, i, local)] for local in lay.names], flat)
        store.put(i, flat)


def state_dict(cfg: ModelConfig, layouts: list[FlatLayout], store: TieredStore) -> dict[str, torch.Tensor]:
    """Every weight as a CPU tensor under its Hugging Face name, gathered from the tiers one layer at a time."""
    out = {}
    for i, lay in enumerate(layouts):
        flat = store.get(i)
        for local, view in zip(lay.names, lay.views(flat)):
            name = source_name(cfg, i, local)
            if name == hf_name(i, cfg.layers, local):  # a tied lm_head is saved once, as the embedding
                out[name] = view.clone()
    return out


class TiedMatrix:
    """A tied embedding matrix trained under BCD: one parameter (the embedding's), in one block (the embedding's),
    receiving the gradients of both uses; the head's copy follows it.

    Why two copies and not one tensor: the plan places the embedding and the head independently (the embedding
    may stream from NVMe while the head stays on the device), and every layer's weights are one flat buffer on
    its tier; one shared tensor would pin both layers to one tier. Two copies cost one matrix write after a step
    that changed it, and they cannot diverge because only the embedding's copy is ever stepped:

    - while the embedding's block trains, the head's copy requires grad too (the head runs backward for the chain
      rule there, so only its weight gradient is added); a hook takes that gradient off the head after each
      micro-batch's backward through the head and adds it to the embedding's gradient of the same micro-batch
      before autograd accumulates it. That is the sum autograd forms for a tensor used twice (h + e, then added
      to the running .grad), so clipping and AdamW see exactly a tied model's gradient;
    - while the head's block trains, the head's copy stays frozen (no gradient, not stepped): the head's other
      parameters (the final norm) train;
    - after any step of either block, sync() writes the embedding's matrix into the head's copy, on its tier.
    Checkpoints save the matrix once, as the embedding (state_dict)."""

    def __init__(self, layers: nn.ModuleList, layouts: list[FlatLayout], store: TieredStore):
        self.layers, self.layouts, self.store = layers, layouts, store
        self.head = len(layers) - 1
        self.copy = layers[self.head].lm_head.weight
        self.pending: list[torch.Tensor] = []   # the head's gradient of the matrix, per micro-batch, in order
        emb = layers[0].embed_tokens.weight
        for p in (self.copy, emb):
            p.requires_grad_(True)  # hooks go on tensors that require grad; the trainer sets it per phase
        self.copy.register_post_accumulate_grad_hook(self._take)
        emb.register_hook(self._add)
        for p in (self.copy, emb):
            p.requires_grad_(False)

    def _take(self, p: torch.Tensor) -> None:
        self.pending.append(p.grad)
        p.grad = None

    def _add(self, grad: torch.Tensor) -> torch.Tensor:
        return grad + self.pending.pop(0) if self.pending else grad

    def enter(self, layers) -> None:
        """A block starts training: the head's copy takes gradients iff the block trains the embedding."""
        self.copy.requires_grad_(0 in layers)
        self.pending.clear()

    def leave(self) -> None:
        self.copy.requires_grad_(False)
        self.copy.grad = None
        self.pending.clear()

    def changes(self, layers) -> bool:
        """Whether a step of this block writes the matrix (or the head's stale copy of it)."""
        return 0 in layers or self.head in layers

    def sync(self) -> None:
        """The embedding's matrix into the head's copy, wherever each lives (no copy engine op may be using the
        head's weights: the trainer calls this between steps)."""
        emb = self.store.get(0)
        lay = self.layouts[self.head]
        flat = self.store.get(self.head)
        lay.views(flat)[lay.names.index("lm_head.weight")].copy_(self.layouts[0].views(emb)[0])
        self.store.put(self.head, flat)
