"""Sorted task-vector magnitudes, kept beside a worker's resident sources.

TIES and breadcrumbs keep a share of each task vector by magnitude: their threshold is an
order statistic of |source - base|, which a merge finds by selection over the whole tensor
(``np.partition`` on a CPU, ``kthvalue`` on a GPU). A worker's sources and base never
change, so the first candidate that ranks a tensor sorts it once
(``sparsify.sorted_abs_delta``) and every later candidate reads its thresholds off the
sorted copy: the same values, so the same thresholds and the same merge, to the bit.

A copy costs 4 bytes per element, a float32 copy of that source tensor, so the copies are
kept within a budget: half the memory free when the worker starts (its sources and
candidate loaded), shared among the workers of one machine; a GPU worker has its device's
to itself. Past the budget a tensor is selected per candidate, as without the copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import psutil
import torch

from ..merge import sparsify
from ..merge.expr import Expr, Merge, Read
from ..merge.kernels import get_kernel, uses_sorted_abs
from ..merge.task_vector import SORTED_ABS


class SortedMagnitudes:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        # None: over the budget, selected per candidate (and never loaded again to find out)
        self._sorted: dict[tuple[Read, Read], torch.Tensor | None] = {}

    @classmethod
    def for_worker(cls, device: str, workers_sharing: int) -> SortedMagnitudes:
        """The budget of one of ``workers_sharing`` workers on ``device``'s memory."""
        return cls(free_bytes(device) // (2 * max(1, workers_sharing)))

    def attach(self, expr: Expr, load: Callable[[Read], torch.Tensor]) -> Expr:
        """``expr`` with each ranked input's sorted magnitudes among its parameters, where
        the kernel ranks them; ``load(read)`` gives a tensor as the kernel sees it."""
        if not isinstance(expr, Merge) or expr.base is None or not uses_sorted_abs(get_kernel(expr.kernel)):
            return expr
        params = []
        for read, mp in zip(expr.inputs, expr.model_params):
            ranked = float(mp.get("density", 1.0)) < 1
            found = self._get(read, expr.base, load) if ranked else None
            params.append(mp if found is None else {**mp, SORTED_ABS: found})
        return dataclasses.replace(expr, model_params=tuple(params))

    def _get(self, read: Read, base: Read, load) -> torch.Tensor | None:
        key = (read, base)
        if key not in self._sorted:
            x = load(read)
            size = x.numel() * 4
            fits = self.used + size <= self.budget
            self._sorted[key] = sparsify.sorted_abs_delta(x, load(base)) if fits else None
            self.used += size if fits else 0
        return self._sorted[key]


def free_bytes(device: str) -> int:
    """Memory free now on ``device``'s side: the GPU's, else the machine's available memory."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return int(psutil.virtual_memory().available)
