"""Linear merge (model soups, SWA): sum_i w_i theta_i / sum_i w_i.

Normalizing is on by default, as in mergekit; the weights are divided by their sum up
front so that each source costs one multiply-add pass. On a CPU the pass runs in
cache-sized steps with one small float32 buffer: adding a bf16 tensor to a float32 one
whole would first materialize a float32 copy of it, a fresh full-size allocation whose
page faults cost more than the arithmetic (bench/bench_merge.py: 12 % of a one-shot
merge's time, and 0.13 GB of its peak memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import UserError
from evomerge.merge import threads

_CPU_STEP = 1 << 17  # elements per step on a CPU: the buffer stays in cache


def merge(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    seed: int = 0,
) -> Tensor:
    """One tensor of the merge; parameters already validated and defaulted."""
    if not tensors:
        raise UserError("linear needs at least one model; list the models to average under 'models'")
    weights = [float(mp["weight"]) for mp in model_params]
    if params["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise UserError(
                f"linear weights {weights} sum to zero, so they cannot be normalized; "
                "make them sum to a nonzero value or set normalize: false"
            )
        weights = [w / total for w in weights]
    if tensors[0].device.type != "cpu":  # a GPU converts bf16 inside the add's own kernel
        out = tensors[0].to(torch.float32, copy=True).mul_(weights[0])
        for x, w in zip(tensors[1:], weights[1:]):
            out.add_(x, alpha=w)
        return out
    flat = [x.reshape(-1) for x in tensors]
    n = flat[0].numel()
    out = torch.empty(n, dtype=torch.float32)  # the one full-size allocation

    def run(first: int, last: int) -> None:
        buffer = torch.empty(min(last - first, _CPU_STEP), dtype=torch.float32)
        for start, stop in threads.steps(first, last, _CPU_STEP):
            part = out[start:stop].copy_(flat[0][start:stop]).mul_(weights[0])
            for x, w in zip(flat[1:], weights[1:]):
                part.add_(buffer[: stop - start].copy_(x[start:stop]), alpha=w)

    threads.map_ranges(run, n, _CPU_STEP)
    return out.view(tensors[0].shape)
