"""Data-flow-space routing, folded into an ordinary checkpoint.

A path of T slots: slot k runs layer l_k of source s_k on its input scaled by
w_k. In a pre-norm block every sub-block reads norm(x), and norm(c*x) == norm(x)
for c > 0 (up to the norm's epsilon). So if the residual stream of the folded
model is the routed model's stream divided by c_k = w_1 * ... * w_k, slot k
computes the same thing when its residual-writing projections (attention out,
MLP down, their biases) are divided by c_k, and the final norm removes c_T.
The result is a plain T-layer model that any tool loads.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UserError
from ..recipe import MERGE_SOURCE, Recipe
from .expr import Output, Read, is_pre_tensor, layer_rests


def route(recipe: Recipe, sources: Mapping, ps_outputs: list[Output], ps_config: dict, out_dtype: torch.dtype | None) -> tuple[list[Output], dict]:
    routing = recipe.routing
    assert routing is not None
    arch = sources[recipe.model_refs()[0]].arch
    writers = arch.residual_writers  # refuses architectures the fold is not exact for

    merged_layers: dict[int, list[Output]] = {}
    for o in ps_outputs:
        hit = arch.split(o.name)
        if hit:
            merged_layers.setdefault(hit[0], []).append(o)

    def layer_count(source: str) -> int:
        return len(merged_layers) if source == MERGE_SOURCE else sources[source].arch.num_layers

    for k, slot in enumerate(routing.slots):
        n = layer_count(slot.source)
        if not 0 <= slot.layer < n:
            raise UserError(f"routing slot {k}: layer {slot.layer} of {slot.source} does not exist (it has layers 0..{n - 1})")

    emb = routing.embeddings or (MERGE_SOURCE if recipe.merge_method else recipe.base_model)
    if emb == MERGE_SOURCE:
        outer = [o for o in ps_outputs if arch.split(o.name) is None]
        config = dict(ps_config)
    else:
        src = sources[emb]
        outer = [_read(src, emb, name, name, out_dtype) for name in src.entries if src.arch.split(name) is None]
        config = dict(src.config)

    outputs = [o for o in outer if is_pre_tensor(o.name)]
    scale = 1.0
    types = config.get("layer_types")
    routed_types = []
    for k, slot in enumerate(routing.slots):
        scale *= slot.scale
        if slot.source == MERGE_SOURCE:
            layer = [(arch.split(o.name)[1], o) for o in merged_layers[slot.layer]]
        else:
            src = sources[slot.source]
            layer = [(rest, _read(src, slot.source, src.arch.layer_tensor(slot.layer, rest), "", out_dtype))
                     for rest in layer_rests(src, slot.layer)]
        for rest, o in layer:
            divide = scale if rest.startswith(writers) else 1.0
            outputs.append(Output(arch.layer_tensor(k, rest), o.shape, o.dtype, o.expr, divide))
        if isinstance(types, list) and slot.layer < len(types):
            routed_types.append(types[slot.layer])
    outputs += [o for o in outer if not is_pre_tensor(o.name)]

    config[arch.layer_count_key] = len(routing.slots)
    if routed_types and len(routed_types) == len(routing.slots):
        config["layer_types"] = routed_types
    return outputs, config


def _read(src, ref: str, name: str, out_name: str, out_dtype) -> Output:
    dtype = src.dtype(name)
    if out_dtype is not None and dtype.is_floating_point:
        dtype = out_dtype
    return Output(out_name or name, src.shape(name), dtype, Read(ref, name))
