"""Linear merge (model soups, SWA): sum_i w_i theta_i / sum_i w_i.

Normalizing is on by default, as in mergekit. The operations are mergekit 0.1.5's, in
its order, so that the float32 result is its result to the bit: each source is one
fused multiply-add into a float32 accumulator (torch's ``add_(x, alpha=w)`` rounds as
mergekit's ``addcmul_`` does), then one division by the float32 sum of the weights.
Dividing the weights up front instead would save that division but moves ~1/3 of the
elements by one ulp (measured against mergekit-yaml, tests/test_mergekit.py).

On a CPU the passes run in cache-sized steps with one small float32 buffer: adding a
bf16 tensor to a float32 one whole would first materialize a float32 copy of it, a fresh
full-size allocation whose page faults cost more than the arithmetic
(bench/bench_merge.py: 12 % of a one-shot merge's time, and 0.13 GB of its peak memory).
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
    divisor = None
    if params["normalize"]:
        # mergekit's divisor: the weights as float32, summed in float32
        total = torch.tensor([weights], dtype=torch.float32).sum(dim=1)
        if abs(float(total)) < 1e-8:
            raise UserError(
                f"linear weights {weights} sum to zero, so they cannot be normalized; "
                "make them sum to a nonzero value or set normalize: false"
            )
        # a 1-element tensor, not a Python number: CUDA turns division by a scalar into a
        # multiplication by its reciprocal, which rounds differently
        divisor = total.to(tensors[0].device)
    if tensors[0].device.type != "cpu":  # a GPU converts bf16 inside the add's own kernel
        out = tensors[0].to(torch.float32, copy=True).mul_(weights[0])
        for x, w in zip(tensors[1:], weights[1:]):
            out.add_(x, alpha=w)
        return out.div_(divisor) if divisor is not None else out
    flat = [x.reshape(-1) for x in tensors]
    n = flat[0].numel()
    out = torch.empty(n, dtype=torch.float32)  # the one full-size allocation

    def run(first: int, last: int) -> None:
        buffer = torch.empty(min(last - first, _CPU_STEP), dtype=torch.float32)
        for start, stop in threads.steps(first, last, _CPU_STEP):
            part = out[start:stop].copy_(flat[0][start:stop]).mul_(weights[0])
            for x, w in zip(flat[1:], weights[1:]):
                part.add_(buffer[: stop - start].copy_(x[start:stop]), alpha=w)
            if divisor is not None:
                part.div_(divisor)

    threads.map_ranges(run, n, _CPU_STEP)
    return out.view(tensors[0].shape)
