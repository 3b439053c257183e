"""Spherical linear interpolation between the base model and one other model.

The angle comes from normalized copies of the flattened tensors; the coefficients are
applied to the unnormalized tensors; when |cos| > 0.9995 the tensors are treated as
parallel and linearly interpolated (mergekit's rule). t = 0 gives the base. The scalar
work stays on the device as 0-dim tensors, so a CUDA merge never waits on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError

PARALLEL_COS = 0.9995
_NORM_EPS = 1e-8  # a tensor with a smaller norm is left unnormalized, as in mergekit


def merge(
    tensors: Sequence[Tensor],
    base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    seed: int = 0,
) -> Tensor:
    """One tensor of the merge; parameters already validated and defaulted."""
    if not tensors:
        return base.to(torch.float32, copy=True)
    if len(tensors) != 1:
        raise UserError(
            f"slerp interpolates the base model with exactly one other model, got {len(tensors)} others; "
            "use linear, ties or dare_ties for more models"
        )
    t = float(params["t"])
    v0 = base.reshape(-1).to(torch.float32)
    v1 = tensors[0].reshape(-1).to(torch.float32)
    norm0 = torch.linalg.vector_norm(v0).double()
    norm1 = torch.linalg.vector_norm(v1).double()
    dot = (v0 * v1).sum().double()
    cos = dot / (torch.where(norm0 > _NORM_EPS, norm0, 1.0) * torch.where(norm1 > _NORM_EPS, norm1, 1.0))
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    parallel = cos.abs() > PARALLEL_COS
    # On the parallel branch sin(theta) may be 0; torch.where drops that NaN.
    c0 = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * theta) / torch.sin(theta))
    c1 = torch.where(parallel, t, torch.sin(t * theta) / torch.sin(theta))
    return (v0 * c0.float() + v1 * c1.float()).view(base.shape)
