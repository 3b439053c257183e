"""RegMean (Jin et al. 2023): the linear layer that best fits every model on its own inputs.

For an ``nn.Linear`` weight W [out, in] and models i with input Grams G_i = X_i^T X_i,
W = argmin sum_i ||X_i W^T - X_i W_i^T||^2, so W^T = (sum_i G_i)^-1 sum_i G_i W_i^T. The
Grams' off-diagonal entries are first scaled by ``alpha`` (G~ = alpha G + (1 - alpha)
diag(G)), the paper's regularization toward plain averaging (``reduce_non_diag`` in the
reference code, bloomberg/dataless-model-merging); alpha = 1 is the exact regression,
alpha = 0 a per-input-feature weighted average. A GPT-2 ``Conv1D`` weight is stored
[in, out], i.e. already W^T, so it is solved without the transposes.

``coefficients`` scale each model's G~_i (the reference multiplies by coefficient times the
number of models, the same solution: it is unchanged by a common factor). Pass every
model's Grams alike, all sums or all per-token means (``GramFile.gram`` / ``.mean``); the
reference keeps means, so models calibrated on different token counts weigh alike.

Solved in float64 with ``torch.linalg.solve``, not an explicit inverse. An input feature
no model ever saw (a zero row and column in every G) is unconstrained by the regression;
its weights are the coefficient-weighted average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.errors import UserError

DEFAULT_ALPHA = 0.9


def scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """alpha * G + (1 - alpha) * diag(G), in float64."""
    g = gram.to(torch.float64) * alpha
    g.diagonal().copy_(gram.diagonal())  # alpha * G_dd + (1 - alpha) * G_dd
    return g


def merge(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = DEFAULT_ALPHA,
          coefficients: Sequence[float] | None = None, conv1d: bool = False) -> Tensor:
    """One linear weight of the RegMean merge; float32, the layout of the inputs."""
    if not weights:
        raise UserError("regmean needs at least one model; list the models under 'models'")
    if len(weights) != len(grams):
        raise UserError(f"regmean got {len(weights)} weights and {len(grams)} Grams; give one Gram per model")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise UserError(f"regmean alpha must be in [0, 1], got {alpha!r}")
    coeffs = [1.0] * len(weights) if coefficients is None else [float(c) for c in coefficients]
    if len(coeffs) != len(weights) or any(not math.isfinite(c) or c < 0 for c in coeffs) or sum(coeffs) <= 0:
        raise UserError(f"regmean coefficients must be one non-negative number per model with a positive sum, got {coefficients}")
    shape = weights[0].shape
    n_in = shape[0] if conv1d else shape[-1]
    for w, g in zip(weights, grams):
        if w.dim() != 2 or w.shape != shape or tuple(g.shape) != (n_in, n_in):
            raise UserError(f"regmean needs 2-d weights of one shape with [in, in] Grams, got weight {list(w.shape)}, Gram {list(g.shape)}")
    device = weights[0].device
    a = torch.zeros((n_in, n_in), dtype=torch.float64, device=device)
    b = torch.zeros((n_in, shape[1] if conv1d else shape[0]), dtype=torch.float64, device=device)
    avg = torch.zeros_like(b)
    for w, g, c in zip(weights, grams, coeffs):
        wt = w.to(device, torch.float64)
        wt = wt if conv1d else wt.T  # [in, out]
        gs = scale_off_diagonal(g.to(device), alpha).mul_(c)
        a += gs
        b += gs @ wt
        avg.add_(wt, alpha=c / sum(coeffs))
    unseen = a.diagonal() == 0
    if bool(unseen.any()):
        a.diagonal()[unseen] = 1.0
        b[unseen] = avg[unseen]
    try:
        wt = torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError:
        raise UserError(
            f"regmean: the summed Gram of a {list(shape)} weight is singular; lower alpha (e.g. 0.9) "
            "or calibrate on more tokens than the layer has inputs"
        ) from None
    return (wt if conv1d else wt.T).to(torch.float32).contiguous()
