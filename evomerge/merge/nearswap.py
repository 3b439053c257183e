"""NearSwap (alchemonaut, QuartetAnemoi): take the other model's value where it is near the base's.

Per entry, w = clamp(t / |base - other|, 0, 1) (the difference clamped to 1e-6 first) and
the merge is w * other + (1 - w) * base: entries within t of the base become the other
model's, distant ones stay the base's. mergekit 0.1.5's rule, in its float32 order.
Elementwise, so it runs in cache-sized chunks on all threads (the same operations per entry:
the same bits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError
from evomerge.merge import threads

_STEP = 1 << 16  # elements per chunk: both models' rows of it stay in cache


def merge(tensors: Sequence[Tensor], base: Tensor, model_params: Sequence[Mapping[str, Any]],
          params: Mapping[str, Any], seed: int = 0) -> Tensor:
    if len(tensors) != 1:
        raise UserError(f"nearswap takes a base_model and exactly one other model, got {len(tensors)} others")
    t = float(params["t"])
    a_all, b_all = base.reshape(-1), tensors[0].reshape(-1)
    out = torch.empty(a_all.shape, dtype=torch.float32, device=base.device)

    def run(first: int, last: int) -> None:
        for start, stop in threads.steps(first, last, _STEP):
            a, b = a_all[start:stop].float(), b_all[start:stop].float()
            weight = torch.sub(a, b).abs_().clamp_(min=1e-6)
            weight = weight.reciprocal_().mul_(t).clamp_(min=0, max=1)  # t / x is torch's reciprocal(x) * t
            # w * b + (1 - w) * a, each product rounded as mergekit rounds it
            torch.add(torch.mul(weight, b), torch.rsub(weight, 1).mul_(a), out=out[start:stop])

    threads.map_ranges(run, out.numel(), _STEP, base.device)
    return out.reshape(base.shape)
