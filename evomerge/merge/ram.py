"""RAM, Reinforced Agent Merging (arXiv:2601.13572), and its tensor-local RAM+ (mergekit's
ram and ramplus_tl).

An entry of a task vector counts as changed when |delta| > ``epsilon``. Where one model
alone changed an entry, its change is kept whole; where several did, their changes are
averaged over the models that changed it; unchanged entries contribute nothing. RAM+
(tensor-local) amplifies the unique changes of a model by 1 + r * clamp(rho, 0, alpha),
rho being that model's count of shared changed entries over its count of unique ones in
this tensor. mergekit 0.1.5's conventions and float32 order of operations; everything but
RAM+'s counts is elementwise, so it runs in cache-sized chunks on all threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.merge import threads

_STEP = 1 << 16  # elements per chunk: the models' rows of it stay in cache


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
    flat_origin = origin.reshape(-1)
    sources = [t.reshape(-1) for t in tensors]
    n = flat_origin.numel()
    out = torch.empty_like(flat_origin)

    def vectors(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        v = torch.stack([x[start:stop].float() for x in sources]).sub_(flat_origin[start:stop])
        changed = v.abs() > epsilon
        return v, changed, changed.sum(dim=0, keepdim=True)

    amplify = None
    if plus is not None:  # RAM+: per-model counts over the whole tensor first (integers: exact in any order)
        def count(first: int, last: int) -> Tensor:
            totals = torch.zeros(2, len(sources), dtype=torch.int64, device=origin.device)
            for start, stop in threads.steps(first, last, _STEP):
                _, changed, counts = vectors(start, stop)
                totals[0] += (changed & (counts > 1)).sum(dim=1)
                totals[1] += (changed & (counts == 1)).sum(dim=1)
            return totals

        shared, unique = sum(threads.map_ranges(count, n, _STEP, origin.device))
        r, alpha = plus
        rho = shared / unique.clamp(min=epsilon)
        amplify = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)

    def run(first: int, last: int) -> None:  # elementwise from here: cache-sized chunks on all threads
        for start, stop in threads.steps(first, last, _STEP):
            v, changed, counts = vectors(start, stop)
            kept = v * changed
            alone = kept * (counts == 1)
            if amplify is not None:
                alone = alone * amplify
            mixed = (alone + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0, keepdim=True)
            torch.add(flat_origin[start:stop], mixed[0], out=out[start:stop])

    threads.map_ranges(run, n, _STEP, origin.device)
    return out.view(origin.shape)
