"""NuSLERP: spherical interpolation of two models, or of their task vectors when a base is
given (mergekit's nuslerp, which has no paper).

The interpolation factor is the second model's share of the two weights (0.5 when they
sum to ~0). By default each tensor is flattened into one vector (``nuslerp_flatten``);
otherwise rows are interpolated one by one along the last axis, or along the first with
``nuslerp_row_wise``. Vectors whose angle is ~0 or ~pi (1 - cos^2 <= 1e-16) are
interpolated linearly. mergekit 0.1.5's conventions and float32 order of operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError

_EPS = 1e-8  # colinearity: 1 - cos^2 <= _EPS ** 2
_NORM_FLOOR = 1e-7  # a vector norm below this is taken as this


def merge(tensors: Sequence[Tensor], base: Tensor | None, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    if len(tensors) != 2:
        raise UserError(f"nuslerp merges exactly two models (besides an optional base_model), got {len(tensors)}")
    w0, w1 = (float(m["weight"]) for m in model_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    a, b = tensors[0].float(), tensors[1].float()
    dim = 0 if params["nuslerp_row_wise"] else -1
    flatten = bool(params["nuslerp_flatten"])
    if base is None:
        return interpolate(t, a, b, dim, flatten)
    origin = base.float()
    return origin + interpolate(t, a - origin, b - origin, dim, flatten)


def interpolate(t: float, v0: Tensor, v1: Tensor, dim: int = -1, flatten: bool = True) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)
