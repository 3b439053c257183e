"""The unfolded reference of a routing path: each slot's block runs on its input times w_k.

This is Akiba et al.'s data-flow semantics. Its fold (what export writes and workers
score) equals it only while the norms' epsilon is negligible against mean(x^2); the
tests use it to show both the agreement at O(1) scales and the disagreement at
realistic ones. Shallow copies keep the shell model untouched.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from evomerge.workers.routed import shallow


class ScaledInput(nn.Module):
    """A block whose input hidden state is multiplied by ``scale``."""

    def __init__(self, layer: nn.Module, scale: float):
        super().__init__()
        self.layer = layer
        self.scale = scale
        # models that pick each block's mask by its attention kind (Qwen2 in transformers < 5.18) read it here
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = kwargs["hidden_states"] * self.scale
        else:
            args = (args[0] * self.scale,) + tuple(args[1:])
        return self.layer(*args, **kwargs)


def routed_view(shell: nn.Module, layer_attr: str, layers: Sequence[tuple[nn.Module, float]],
                layer_count_key: str, layer_types: list | None = None) -> nn.Module:
    """``shell`` with its blocks (at dotted path ``layer_attr``, e.g. 'model.layers') replaced by ``layers``.

    ``layer_types`` (per-slot attention kinds, for configs that have them) follow the path's layers.
    """
    config = copy.deepcopy(shell.config)
    setattr(config, layer_count_key, len(layers))
    config.use_cache = False  # repeated blocks share layer_idx; no KV cache in scoring anyway
    if layer_types is not None:
        config.layer_types = list(layer_types)
    view = shallow(shell)
    view.config = config
    node = view
    *path, last = layer_attr.split(".")
    for name in path:
        child = shallow(getattr(node, name))
        if hasattr(child, "config"):
            child.config = config
        node._modules[name] = child
        node = child
    node._modules[last] = nn.ModuleList(ScaledInput(layer, scale) for layer, scale in layers)
    return view
