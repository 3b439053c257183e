"""Spherical linear interpolation between the base model and one other model.

The angle comes from normalized copies of the flattened tensors; the coefficients are
applied to the unnormalized tensors; when |cos| > 0.9995 the tensors are treated as
parallel (or antipodal) and linearly interpolated; a norm below 1e-8 is taken as 1.
t = 0 gives the base.

These are mergekit 0.1.5's rules, and so is the arithmetic, step by step, so that a
float32 result is its result to the bit: float32 throughout (not float64), the norms
and the dot product summed per step of 2**20 elements and then over the steps (what
mergekit does for a tensor merged on its own), the cosine as the dot product of the
normalized copies, clamped to [-1, 1], and the result as c0 * v0 + c1 * v1 in two
products and a sum. The scalar work stays on the device as tensors, so a CUDA merge
never waits on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError

PARALLEL_COS = 0.9995
_NORM_EPS = 1e-8  # a tensor with a smaller norm is left unnormalized, as in mergekit
_STEP = 1 << 20  # elements per reduction step: bounds the float32 scratch, and fixes the summation order
_F32 = torch.float32


def merge(
    tensors: Sequence[Tensor],
    base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    seed: int = 0,
) -> Tensor:
    """One tensor of the merge; parameters already validated and defaulted."""
    if not tensors:
        return base.to(_F32, copy=True)
    if len(tensors) != 1:
        raise UserError(
            f"slerp interpolates the base model with exactly one other model, got {len(tensors)} others; "
            "use linear, ties or dare_ties for more models"
        )
    # rows of one: mergekit reduces along dim 1 of (tensors in its batch, elements)
    v0, v1 = base.reshape(1, -1), tensors[0].reshape(1, -1)
    device = v0.device
    t = torch.tensor([[float(params["t"])]], dtype=_F32, device=device)
    n = v0.shape[1]
    if n == 0:
        return base.to(_F32, copy=True)
    spans = [(start, min(start + _STEP, n)) for start in range(0, n, _STEP)]
    # two float32 step buffers; a bf16 input is widened inside each operation, which gives
    # the values converting it first would (bf16 -> float32 is exact)
    buf0, buf1 = (torch.empty(1, min(n, _STEP), dtype=_F32, device=device) for _ in range(2))

    def norm(v: Tensor) -> Tensor:
        steps = []
        for a, b in spans:
            x = v[:, a:b] if v.dtype == _F32 else buf0[:, : b - a].copy_(v[:, a:b])
            steps.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        total = torch.linalg.vector_norm(torch.stack(steps), dim=0)
        return torch.where(total > _NORM_EPS, total, 1.0)

    norm0, norm1 = norm(v0), norm(v1)
    dots = []
    for a, b in spans:
        x = torch.div(v0[:, a:b], norm0, out=buf0[:, : b - a])
        y = torch.div(v1[:, a:b], norm1, out=buf1[:, : b - a])
        dots.append(x.mul_(y).sum(dim=1, keepdim=True))
    cos = torch.stack(dots).sum(dim=0).clamp(-1.0, 1.0)
    parallel = cos.abs() > PARALLEL_COS
    # theta = 0 on the parallel branch keeps every value finite; sin(0) = 0 there only
    # divides in the branch torch.where drops
    theta = torch.arccos(torch.where(parallel, 0.0, cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(parallel, t, torch.sin(t * theta) / sin_theta)
    out = torch.empty(1, n, dtype=_F32, device=device)
    for a, b in spans:  # c0 * v0 + c1 * v1: two rounded products, then their rounded sum
        torch.mul(v0[:, a:b], c0, out=out[:, a:b]).add_(torch.mul(v1[:, a:b], c1, out=buf1[:, : b - a]))
    return out.view(base.shape)
