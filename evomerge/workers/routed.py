"""A routed candidate as a live model: the folded checkpoint, built over resident blocks.

Export writes a routed recipe as an ordinary T-layer model whose slot-k residual
writers are divided by the cumulative scale c_k (merge/routing.py). A worker scores
exactly that function: its blocks are shallow copies of the resident source blocks
(or of the candidate's own merged blocks for slots of source `merge`) in which each
tensor that export changes (the folded writers, and any tensor cast to another output
dtype) is replaced by a preallocated buffer holding ``compute(output)``: the same plan
output through the same function export calls, so the same bits. Every other tensor
is shared with the resident model, so a path copies only what it folds.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn

from ..merge.expr import Output, Read
from ..merge.materialize import Plan, compute
from ..recipe import MERGE_SOURCE, Recipe
from .resident import blocks_of


class RoutedBuilder:
    """Builds routed candidates for one worker; owns the reused fold buffers."""

    def __init__(self, layer_prefix: str, layer_count_key: str, device: str, compute_dtype: torch.dtype):
        self.prefix, self.count_key = layer_prefix, layer_count_key
        self.device, self.compute_dtype = device, compute_dtype
        self.buffers: dict[str, torch.Tensor] = {}  # output name -> its tensor, rewritten per candidate

    def build(self, recipe: Recipe, p: Plan, models: Mapping[str, nn.Module], stored_dtype: Callable[[Read], torch.dtype],
              get: Callable[[Read], torch.Tensor], arch) -> nn.Module:
        """``models``: source ref (or `merge`) -> live model; ``get`` serves ``compute``'s reads."""
        routing = recipe.routing
        emb = routing.embeddings or (MERGE_SOURCE if recipe.merge_method else recipe.base_model)
        slot_new: list[dict[str, torch.Tensor]] = [{} for _ in routing.slots]
        outer_new: dict[str, torch.Tensor] = {}
        for o in p.outputs:
            if not self._changed(o, stored_dtype):
                continue
            value = self._fill(o, get)
            hit = arch.split(o.name)
            if hit is None:
                outer_new[o.name] = value
            else:
                slot_new[hit[0]][hit[1]] = value
        blocks = []
        for slot, new in zip(routing.slots, slot_new):
            block = blocks_of(models[slot.source], self.prefix)[slot.layer]
            blocks.append(overlay(block, new) if new else block)
        return _with_blocks(overlay(models[emb], outer_new), self.prefix, blocks, p.config, self.count_key)

    @staticmethod
    def _changed(o: Output, stored_dtype) -> bool:
        """Whether export writes something other than the live tensor this output reads."""
        if o.divide_by != 1.0:
            return True
        # a `merge` read or a Merge (the merge's embeddings/head) is the candidate's tensor as written
        return isinstance(o.expr, Read) and o.expr.source != MERGE_SOURCE and stored_dtype(o.expr) != o.dtype

    def _fill(self, o: Output, get) -> torch.Tensor:
        buf = self.buffers.get(o.name)
        if buf is None or tuple(buf.shape) != o.shape:
            buf = self.buffers[o.name] = torch.empty(o.shape, dtype=self.compute_dtype, device=self.device)
        return buf.copy_(compute(o, get, self.device))


def overlay(root: nn.Module, new: Mapping[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``root`` whose parameters at the dotted names in ``new`` are replaced.

    Every name bound to a replaced parameter object is rebound too, so a tied head follows
    its embedding. Modules off the replaced paths are shared with ``root``, untouched.
    """
    if not new:
        return root
    params = dict(root.named_parameters(remove_duplicate=False))
    by_id = {id(params[name]): t for name, t in new.items()}
    copies: dict[str, nn.Module] = {"": shallow(root)}

    def module_at(path: str) -> nn.Module:
        if path not in copies:
            parent, _, leaf = path.rpartition(".")
            node = module_at(parent)
            copies[path] = node._modules[leaf] = shallow(node._modules[leaf])
        return copies[path]

    for name, p in params.items():
        if id(p) in by_id:
            path, _, leaf = name.rpartition(".")
            module_at(path)._parameters[leaf] = nn.Parameter(by_id[id(p)], requires_grad=False)
    return copies[""]


def shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose child, parameter and buffer tables can be changed alone."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def _with_blocks(shell: nn.Module, prefix: str, blocks: list[nn.Module], out_config: dict, count_key: str) -> nn.Module:
    """``shell`` (shallow-copied) with its block list replaced; its config says what export's says."""
    config = copy.deepcopy(shell.config)
    setattr(config, count_key, len(blocks))
    config.use_cache = False  # repeated blocks share a layer_idx; scoring needs no KV cache
    if isinstance(out_config.get("layer_types"), list):
        config.layer_types = list(out_config["layer_types"])
    view = shallow(shell)
    view.config = config
    node = view
    *path, last = prefix.split(".")
    for name in path:
        child = shallow(node._modules[name])
        if hasattr(child, "config"):
            child.config = config
        node._modules[name] = child
        node = child
    node._modules[last] = nn.ModuleList(blocks)
    return view
