"""Model Stock (Jang et al. 2024): interpolate the fine-tunes' average back toward the base.

With k fine-tunes whose task vectors meet at a mean pairwise cosine c, the paper's
interpolation ratio is t = k c / (1 + (k - 1) c), and the merge is t * average + (1 - t) * base:
the closer the fine-tunes' directions, the more of their average is kept. mergekit 0.1.5's
conventions: the cosine of each pair with its norm product clamped to 1e-6 and the cosine to
[-1, 1], t = 0 (the base) where 1 + (k - 1) c vanishes; ``filter_wise`` takes one ratio per
row (output unit) instead of one per tensor. Computed in float32, in mergekit's order of
operations, so a float32 merge is its merge to the bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError


def merge(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    if len(tensors) < 2:
        raise UserError(f"model_stock needs a base_model and at least two other models, got {len(tensors)} other")
    w0, ws = base.float(), [t.float() for t in tensors]
    shape = w0.shape
    if params["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0[None], [w[None] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)
