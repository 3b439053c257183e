"""NearSwap (alchemonaut, QuartetAnemoi): take the other model's value where it is near the base's.

Per entry, w = clamp(t / |base - other|, 0, 1) (the difference clamped to 1e-6 first) and
the merge is w * other + (1 - w) * base: entries within t of the base become the other
model's, distant ones stay the base's. mergekit 0.1.5's rule, in its float32 order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from evomerge.errors import UserError


def merge(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    if len(tensors) != 1:
        raise UserError(f"nearswap takes a base_model and exactly one other model, got {len(tensors)} others")
    a, b = base.float(), tensors[0].float()
    weight = (float(params["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a
