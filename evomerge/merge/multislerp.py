"""Multi-SLERP: a weighted mean of several models on the hypersphere (mergekit's multislerp,
after Goddard's note; no paper).

Each model (its task vector when a base is given) is projected to the unit sphere; the
weighted mean of the unit vectors, renormalized, is the point the others are mapped
around: their tangent vectors there are averaged with the same weights and mapped back
by the exponential map, and the result is scaled to the weighted mean of the models'
norms. Whole tensors are flattened, so one tensor is one point. mergekit 0.1.5's
conventions: weights normalized to sum 1 (``normalize_weights``), ``eps`` added to every
norm, one model returned as it is, two models whose unit mean vanishes interpolated
linearly, more refused. Float32, in mergekit's order of operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError


def merge(tensors: Sequence[Tensor], base: Tensor | None, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    if len(tensors) == 1:
        return tensors[0].float().clone()
    eps = float(params["eps"])
    points = torch.stack([t.float() for t in tensors])
    origin = base.float() if base is not None else None
    if origin is not None:
        points -= origin
    flat = points.view(points.shape[0], -1)
    weights = torch.tensor([float(m["weight"]) for m in model_params], dtype=torch.float32)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise UserError("multislerp: the weighted mean of the models' directions is zero (antipodal models "
                            "with balancing weights); change the weights")
        out = (points[0] * weights[0] + points[1] * weights[1]).view(points.shape[1:])
        return out + origin if origin is not None else out
    mean = mean / mean_norm
    tangent = unit - (unit * mean).sum(-1, keepdim=True) * mean
    step = (tangent * weights.view(-1, 1)).sum(0)
    length = torch.norm(step) + eps
    out = mean * torch.cos(length) + step * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * weights).sum()).view(points.shape[1:])
    return out + origin if origin is not None else out
