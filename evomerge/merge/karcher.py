"""The Karcher mean: the models' weighted Riemannian mean on the unit sphere, times their mean norm.

Each tensor is split into its norm and its direction; the directions' Karcher (Fréchet)
mean is found by fixed-point iteration (the log map's weighted average, then the exp map),
and rescaled by the weighted mean of the norms. Equal weights, as mergekit 0.1.5's
``karcher``; its conventions: tensors of norm below ``tol`` leave the mean (but not the
norm average), at most ``max_iter`` steps, stopping once the tangent's norm is below
``tol``; float32 arithmetic in its order, so a float32 merge is its merge to the bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def merge(tensors: Sequence[Tensor], base: Tensor | None, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    xs = [t.float() for t in tensors]
    if len(xs) == 1:
        return xs[0].clone()
    return karcher_mean(xs, [1.0 / len(xs)] * len(xs), int(params["max_iter"]), float(params["tol"]))


def karcher_mean(xs: list[Tensor], alphas: list[float], max_iter: int, tol: float) -> Tensor:
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return sum(x * 0 for x in xs)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = points[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean
