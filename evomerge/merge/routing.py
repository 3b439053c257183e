"""Data-flow-space routing, folded into an ordinary checkpoint.

A path of T slots: slot k runs layer l_k of source s_k on its input scaled by
w_k. In a pre-norm block every sub-block reads norm(x), and norm(c*x) == norm(x)
for c > 0 (up to the norm's epsilon). So if the residual stream of the folded
model is the routed model's stream divided by c_k = w_1 * ... * w_k, slot k
computes the same thing when its residual-writing projections (attention out,
MLP down, their biases) are divided by c_k, and the final norm removes c_T.
The result is a plain T-layer model that any tool loads.

The fold is exact only while the norm's epsilon is negligible against mean(x^2),
which real embeddings (std ~0.02) do not guarantee. So the folded model is not
an approximation of the routed one: it *is* the candidate. Workers score the
folded function (``workers/routed.py`` builds it from this plan, dividing the
same tensors the same way), and export writes it, so the two agree to the bit.

A slot of the recipe's own merge reads the merge's tensor as written (rounded to
the output dtype) and folds that, so a worker can fold the merged tensors it
already holds instead of merging them again.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UserError
from ..recipe import MERGE_SOURCE, Recipe
from .expr import Output, Read, is_pre_tensor, layer_rests

# The cumulative scale c_k is kept within [1/L, L]. Dividing a tensor by c_k moves its
# exponent by log2(c_k): with bfloat16's or float32's 8 exponent bits, 2^4 either way
# keeps every weight of a real model (|w| in 1e-30..1e30) normal and finite, and the
# residual stream within 16x of its usual size; float16's 5 bits (max 65504, smallest
# normal 6e-5) allow only 2^2, since real models' largest activations reach ~1e4.
FOLD_LIMITS = {torch.float32: 16.0, torch.bfloat16: 16.0, torch.float16: 4.0}


def fold_limit(dtypes) -> float:
    """The tightest limit on c_k among the output dtypes of a routed model."""
    return min(FOLD_LIMITS.get(d, 16.0) for d in dtypes) if dtypes else 16.0


def fold(t: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    """A residual writer of a slot with cumulative scale ``c``, in the output dtype.

    A multiplication by the float32 reciprocal: IEEE-exact on every device, so a GPU
    worker and a CPU export give the same bits (a division by a scalar is rewritten
    as a reciprocal multiply on some backends and not on others).
    """
    return (t.to(torch.float32) * (1.0 / c)).to(dtype)


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
    scales = []
    for k, slot in enumerate(routing.slots):
        scale *= slot.scale
        scales.append(scale)
        if slot.source == MERGE_SOURCE:
            layer = [(arch.split(o.name)[1], Output(o.name, o.shape, o.dtype, Read(MERGE_SOURCE, o.name)))
                     for o in merged_layers[slot.layer]]
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
    _check_scales(scales, {o.dtype for o in outputs if o.divide_by != 1.0})

    config[arch.layer_count_key] = len(routing.slots)
    if routed_types and len(routed_types) == len(routing.slots):
        config["layer_types"] = routed_types
    return outputs, config


def _check_scales(scales: list[float], dtypes) -> None:
    limit = fold_limit(dtypes)
    for k, c in enumerate(scales):
        # the codec rounds scales to 6 decimals: allow that much past the limit
        if not 1 / limit / (1 + 1e-4) <= c <= limit * (1 + 1e-4):
            raise UserError(
                f"routing slot {k}: the product of the scales up to it is {c:.4g}, outside [1/{limit:g}, {limit:g}], "
                f"which does not fold safely into {'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} "
                "weights; bring the slot scales closer to 1")


def _read(src, ref: str, name: str, out_name: str, out_dtype) -> Output:
    dtype = src.dtype(name)
    if out_dtype is not None and dtype.is_floating_point:
        dtype = out_dtype
    return Output(out_name or name, src.shape(name), dtype, Read(ref, name))
