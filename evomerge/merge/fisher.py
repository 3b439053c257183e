"""Fisher-weighted averaging (Matena & Raffel 2022): sum_i l_i F_i theta_i / sum_i l_i F_i.

F_i is model i's diagonal Fisher for this tensor (evomerge/stats/fisher.py) and l_i its
merge weight. Each F_i is floored as max(F_i, floor), every model's alike: the reference
code (mmatena/model_merging, ``_merge_with_coeffs``) takes this max for the target model
only by default and for every model with ``favor_target_model=False``; flooring all of
them keeps the merge symmetric in its models, and where every Fisher is below the floor
the result is the weighted average. The reference also divides each l_i by the L2 norm
of model i's whole Fisher (``normalize_fishers``); that is a per-model constant, so the
caller applies it once per model, not this per-tensor kernel.
Arithmetic in float32, the result float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.errors import UserError

DEFAULT_FLOOR = 1e-6  # the reference code's fisher_floor


def merge(tensors: Sequence[Tensor], fishers: Sequence[Tensor], weights: Sequence[float],
          floor: float = DEFAULT_FLOOR) -> Tensor:
    """One tensor of the Fisher merge of ``tensors`` (one per model, like shapes)."""
    if not tensors:
        raise UserError("fisher merging needs at least one model; list the models under 'models'")
    if not len(tensors) == len(fishers) == len(weights):
        raise UserError(f"fisher merging got {len(tensors)} tensors, {len(fishers)} Fishers and {len(weights)} weights; give one of each per model")
    lam = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in lam) or sum(lam) <= 0:
        raise UserError(f"fisher merge weights must be non-negative with a positive sum, got {lam}")
    if not math.isfinite(floor) or floor <= 0:
        raise UserError(f"fisher floor must be a positive number, got {floor!r}")
    shape = tensors[0].shape
    for t, f in zip(tensors, fishers):
        if t.shape != shape or f.shape != shape:
            raise UserError(f"fisher merging needs like shapes, got tensor {list(t.shape)} and Fisher {list(f.shape)} against {list(shape)}")
    num = torch.zeros(shape, dtype=torch.float32, device=tensors[0].device)
    den = torch.zeros_like(num)
    for t, f, w in zip(tensors, fishers, lam):
        if w == 0:
            continue
        wf = f.to(num.device, torch.float32).clamp_min(floor).mul_(w)
        den += wf
        num.addcmul_(wf, t.to(num.device, torch.float32))
    return num.div_(den)
