"""SCE (Wan et al. 2024, FuseChat, arXiv:2408.07990): Select, Calculate, Erase.

Select: keep the ``select_topk`` share of entries whose task vectors vary most across the
models (population variance, among the entries where it is nonzero). Calculate: each
model's weight is its task vector's mean square, normalized over the models (equal when
they all vanish). Erase: drop the entries whose sign disagrees with the sign of the
models' sum (TIES' election; a zero counts for neither side), then average the rest with
those weights. mergekit 0.1.5's conventions and float32 order of operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.merge.sparsify import kth_smallest


def merge(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    origin = base.float()
    if not tensors:
        return origin.clone()
    vectors = torch.stack([t.float() - origin for t in tensors])
    topk = float(params["select_topk"])
    if topk < 1:
        vectors = vectors * select_mask(vectors, topk).unsqueeze(0)
    elected = (vectors.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
    agrees = vectors.sign() == elected
    weights = model_weights(vectors)
    while weights.dim() < vectors.dim():
        weights = weights.unsqueeze(-1)
    kept = weights * agrees
    mixed = (vectors * kept).sum(dim=0)
    return origin + mixed / torch.sum(kept, dim=0).clamp(min=1e-6)


def model_weights(vectors: Tensor) -> Tensor:
    """Each task vector's mean square, over their sum (1/n each when the sum is ~0)."""
    power = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(power).item()
    if abs(total) < 1e-6:
        return torch.ones_like(power) / power.shape[0]
    return power / total


def select_mask(vectors: Tensor, share: float) -> Tensor:
    """1 at the int(share * nonzero) entries of largest variance across models, else 0.

    mergekit takes them with ``torch.topk``, which costs a sort of the tensor; the same set
    is every entry at or above the k-th largest variance, found by selection in O(n),
    unless entries tie at that value: then topk's own choice among them is kept."""
    if share <= 0:
        return torch.zeros_like(vectors[0])
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * share)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    flat = variance.abs().view(-1)
    above = flat >= kth_smallest(flat, flat.numel() - k + 1)
    if int(torch.count_nonzero(above)) == k:
        return above.to(mask.dtype).view(mask.shape)
    _, index = torch.topk(flat, k=k, largest=True)
    mask.view(-1)[index] = 1
    return mask
