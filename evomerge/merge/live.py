"""Recipes as models in memory, for the commands that score many merges of a few models
(greedy soups, interpolation paths) without writing each to disk.

A live model holds the tensors `evomerge merge` would write for the same recipe and
sources (the same plan and kernels, rounded to the output dtype), computed in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..io.layers import Architecture
from ..recipe import Recipe
from .materialize import TensorSource, compute, plan


class MemorySource:
    """A model's tensors held in memory (an aligned copy of a model, say), beside its
    directory: the tokenizer and anything else not in the tensors are read from ``path``."""

    def __init__(self, path: str | Path, config: dict, tensors: Mapping[str, torch.Tensor]):
        self.path, self.config, self.tensors = Path(path), dict(config), dict(tensors)
        self.entries = self.tensors
        self.arch = Architecture.from_config(self.config, self.tensors, where=str(path))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def live_state(recipe: Recipe, sources: Mapping[str, TensorSource], device: str = "cpu") -> tuple[dict, dict]:
    """(tensors, config.json) of the recipe's result, in memory."""
    p = plan(recipe, sources)

    def get(read):
        return sources[read.source].get(read.name)

    return {o.name: compute(o, get, device) for o in p.outputs}, p.config


def to_model(tensors: Mapping[str, torch.Tensor], config: dict, device: str = "cpu",
             dtype: torch.dtype = torch.float32, into: torch.nn.Module | None = None) -> torch.nn.Module:
    """An HF causal LM holding ``tensors`` (computing in ``dtype``), ready to score.
    ``into``: a model of the same config to overwrite instead (a path's next point)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if into is not None:
        model, hf_config = into, into.config
    else:
        cfg = dict(config)
        hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        # the random init is overwritten at once; forked so it leaves the global RNG alone
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).to(device)
    state = model.state_dict()
    missing = [n for n in state if n not in tensors and not _tied(n, hf_config)]
    if missing:
        raise ValueError(f"the merged tensors lack {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for name, t in tensors.items():
            if name in state:
                state[name].copy_(t)
    model.config.use_cache = False
    return model.eval()


def _tied(name: str, config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")
