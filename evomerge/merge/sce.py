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

from evomerge.merge import threads
from evomerge.merge.sparsify import kth_smallest

_STEP = 1 << 16  # elements per chunk: the models' rows of it stay in cache


def merge(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    origin = base.float()
    if not tensors:
        return origin.clone()
    vectors = torch.stack([t.float() - origin for t in tensors])
    flat, flat_origin = vectors.view(len(tensors), -1), origin.reshape(-1)
    topk = float(params["select_topk"])
    if topk < 1:
        flat.mul_(select_mask(flat, topk)[None])
    weights = model_weights(vectors)[:, None]
    out = torch.empty_like(flat_origin)

    def run(first: int, last: int) -> None:  # everything else is elementwise: cache-sized chunks on all threads
        for start, stop in threads.steps(first, last, _STEP):
            v = flat[:, start:stop]
            elected = (v.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
            kept = weights * (v.sign() == elected)
            mixed = (v * kept).sum(dim=0)
            torch.add(flat_origin[start:stop], mixed / torch.sum(kept, dim=0).clamp(min=1e-6), out=out[start:stop])

    threads.map_ranges(run, out.numel(), _STEP, out.device)
    return out.view(origin.shape)


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
    variance = population_variance(vectors)
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


def population_variance(rows: Tensor) -> Tensor:
    """``torch.var(rows, dim=0, unbiased=False)``, bit for bit, several times faster: the same
    Welford updates in float64 that torch's CPU kernel runs per entry, over cache-sized chunks
    on all threads (torch's own reduction across the model axis is the slow part of SCE)."""
    out = torch.empty(rows.shape[1:], dtype=torch.float32, device=rows.device)
    flat_rows, flat_out = rows.reshape(rows.shape[0], -1), out.view(-1)

    def run(first: int, last: int) -> None:
        for start, stop in threads.steps(first, last, _STEP):
            mean = torch.zeros(stop - start, dtype=torch.float64, device=rows.device)
            m2 = torch.zeros_like(mean)
            for i, row in enumerate(flat_rows[:, start:stop]):
                x = row.double()
                delta = x - mean
                mean += delta / (i + 1)
                m2 += delta * (x - mean)
            flat_out[start:stop] = m2 / rows.shape[0]

    threads.map_ranges(run, flat_out.numel(), _STEP, rows.device)
    return out
