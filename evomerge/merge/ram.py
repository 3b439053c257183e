"""RAM, Reinforced Agent Merging (arXiv:2601.13572), and its tensor-local RAM+ (mergekit's
ram and ramplus_tl).

An entry of a task vector counts as changed when |delta| > ``epsilon``. Where one model
alone changed an entry, its change is kept whole; where several did, their changes are
averaged over the models that changed it; unchanged entries contribute nothing. RAM+
(tensor-local) amplifies the unique changes of a model by 1 + r * clamp(rho, 0, alpha),
rho being that model's count of shared changed entries over its count of unique ones in
this tensor. mergekit 0.1.5's conventions and float32 order of operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def merge(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    return _merge(tensors, base, float(params["epsilon"]), None)


def merge_plus(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
               params: Mapping[str, Any], seed: int = 0) -> Tensor:
    return _merge(tensors, base, float(params["epsilon"]), (float(params["r"]), float(params["alpha"])))


def _merge(tensors: Sequence[Tensor], base: Tensor, epsilon: float, plus: tuple[float, float] | None) -> Tensor:
    origin = base.float()
    if not tensors:
        return origin.clone()
    vectors = torch.stack([t.float() - origin for t in tensors]).view(len(tensors), -1)
    changed = vectors.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    kept = vectors * changed
    alone = kept * unique
    if plus is not None:
        r, alpha = plus
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
        alone = alone * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    mixed = (alone + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return origin + mixed.reshape_as(origin)
