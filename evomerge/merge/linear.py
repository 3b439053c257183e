"""Linear merge (model soups, SWA): sum_i w_i theta_i / sum_i w_i.

Normalizing is on by default, as in mergekit; the weights are divided by their sum up
front so that each source costs one fused multiply-add pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError


def merge(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    seed: int = 0,
) -> Tensor:
    """One tensor of the merge; parameters already validated and defaulted."""
    if not tensors:
        raise UserError("linear needs at least one model; list the models to average under 'models'")
    weights = [float(mp["weight"]) for mp in model_params]
    if params["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise UserError(
                f"linear weights {weights} sum to zero, so they cannot be normalized; "
                "make them sum to a nonzero value or set normalize: false"
            )
        weights = [w / total for w in weights]
    out = tensors[0].to(torch.float32, copy=True)  # the one full-size allocation
    out.mul_(weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x, alpha=w)  # promotes bf16/fp16 to float32 on the fly, no copy
    return out
