"""The model families the ladder streams layer by layer, and how one stage of such
a model runs: the embedding, one decoder layer, or the final norm and the head.

A stage runs through transformers' own modules and forward: the decoder-layer
stage calls the model's own `forward` with `inputs_embeds` (the hidden states the
previous stage left), its layer list cut after the layer (the layers before it
pass their input on, so it keeps its index) and its final norm taken out, so the
layer gets the causal or sliding-window mask, the rotary embedding and the
position ids the whole model would give it, on whichever transformers version is
installed (4.x under mergekit 0.1.4, 5.x elsewhere). The
head stage runs the same forward with no layers and the norm in place. The
stages chained give the whole model's forward, operation for operation.
"""

from __future__ import annotations

import contextlib
import re
from typing import Dict, List, Optional

import torch

#: config.model_type of the families streamed layer by layer: decoder layers in
#: `model.layers`, the embedding in `model.embed_tokens`, `model.norm`, `lm_head`;
#: embeddings added to nothing (no scaling of inputs_embeds in their forward).
STREAMED = ("llama", "mistral", "qwen2")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBEDDING = "embedding"
HEAD = "head"


def unsupported(model) -> Optional[str]:
    """Why `model` cannot be streamed layer by layer; None where it can."""
    kind = getattr(model.config, "model_type", None)
    if kind not in STREAMED:
        return f"model type {kind!r} (streamed: {', '.join(STREAMED)})"
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm")
    if inner is None or not all(hasattr(inner, part) for part in parts) or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} has no model.embed_tokens, model.layers, model.norm and lm_head"
    strays = [name for name, _ in model.named_parameters(remove_duplicate=False) if stage_of(name) is None]
    if strays:
        return f"weights outside the embedding, the decoder layers and the head ({strays[0]})"
    return None


def stage_of(name: str):
    """The stage a weight belongs to: EMBEDDING, a layer's index, or HEAD."""
    if name.startswith("model.embed_tokens."):
        return EMBEDDING
    match = _LAYER.match(name)
    if match:
        return int(match.group(1))
    if name.startswith(("model.norm.", "lm_head.")):
        return HEAD
    return None


def stages(model) -> List[object]:
    """The stages in forward order: the embedding, each layer, the head."""
    return [EMBEDDING, *range(len(model.model.layers)), HEAD]


def weights_by_stage(model) -> Dict[object, List[str]]:
    """Each stage's weight names (a tied head's weight under the head too)."""
    found: Dict[object, List[str]] = {stage: [] for stage in stages(model)}
    for name, _ in model.named_parameters(remove_duplicate=False):
        found[stage_of(name)].append(name)
    return found


def tied_head(model) -> bool:
    """The head's weight is the embedding's (tie_word_embeddings)."""
    return model.lm_head.weight is model.model.embed_tokens.weight


@contextlib.contextmanager
def _only(model, layers: list, norm: bool):
    """The model with its layer list cut to `layers` and, unless `norm`, no final norm."""
    inner = model.model
    kept_layers, kept_norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(layers)
    if not norm:
        inner.norm = torch.nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = kept_layers, kept_norm


def run_stage(model, stage, batch: torch.Tensor) -> torch.Tensor:
    """One stage's forward: token ids -> hidden states (EMBEDDING), hidden states
    -> hidden states (a layer), hidden states -> logits (HEAD)."""
    if stage == EMBEDDING:
        return model.model.embed_tokens(batch)
    if stage == HEAD:
        with _only(model, [], norm=True):
            return model(inputs_embeds=batch, use_cache=False).logits
    layers = model.model.layers
    # The layers before this one pass their input on, so that this layer keeps its
    # index: some forwards pick each layer's mask by index (Qwen2's layer_types[i]).
    passed = [_Skip(layer) for layer in layers[:stage]]
    with _only(model, [*passed, layers[stage]], norm=False):
        return model.model(inputs_embeds=batch, use_cache=False).last_hidden_state


class _Skip(torch.nn.Module):
    """A decoder layer's place in the layer list, passing its input on unchanged;
    keeps the attention type a forward may read from the layer."""

    def __init__(self, layer):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states
