"""The task-vector combine as one elementwise function, for ``torch.compile`` to fuse.

On a GPU the eager loop in ``task_vector`` is launch- and bandwidth-bound (DESIGN.md,
Llama-2-7B shapes on an H200: unfused ops 0.43 s per TIES re-merge, a fused kernel
22 ms), so there the combine runs compiled: the first call compiles (~6 s), which a
search worker pays once. On a CPU the eager loop is the default: it is about as fast as
the compiled code once warm and needs neither the start-up nor a C++ compiler, which
inductor needs on a CPU.

``EVOMERGE_COMPILE``: unset = compile CUDA tensors of 2**20 elements and more; ``1`` =
compile everything (a long-lived CPU worker may gain; compile errors surface);
``0`` = never. The eager loop is the reference, and tests hold the two equal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.merge import rng

log = logging.getLogger(__name__)

_F32 = torch.float32
_MIN_NUMEL = 1 << 20  # below this a compiled call saves less than its dispatch costs
_compiled = None
_broken = False


def combine(
    base: Tensor, xs: Sequence[Tensor], *, kind: str, lo: Sequence[float], hi: Sequence[float],
    keys: Sequence[int], cutoffs: Sequence[int], coefs: Sequence[float], elect_unweighted: bool,
    weights: Sequence[float], lam: float, consensus: bool, normalize: bool,
) -> Tensor | None:
    """What ``task_vector._combine`` computes (same arguments, spelled out), compiled; None
    when compiling is off for this tensor or has failed, and the caller runs the eager loop."""
    global _compiled
    if not _use_compile(base):
        return None
    from torch._dynamo.exc import TorchDynamoException  # loaded only when compiling

    if _compiled is None:
        _compiled = torch.compile(_elementwise, dynamic=True)
    device = base.device

    def vector(values, dtype=_F32):
        return torch.tensor(list(values), dtype=dtype, device=device)

    # Scalars travel as tensors, so new values never trigger a recompile.
    try:
        return _compiled(
            base, list(xs), vector(lo), vector(hi), vector(keys, torch.int64), vector(cutoffs, torch.int64),
            vector(coefs), vector(weights), vector([lam])[0],
            kind=kind, consensus=consensus, normalize=normalize, elect_unweighted=elect_unweighted,
        )
    except TorchDynamoException:
        if os.environ.get("EVOMERGE_COMPILE") == "1":
            raise
        _give_up()
        return None


def _elementwise(
    base: Tensor, xs: list[Tensor], lo: Tensor, hi: Tensor, keys: Tensor, cutoffs: Tensor, coefs: Tensor,
    weights: Tensor, lam: Tensor, *, kind: str, consensus: bool, normalize: bool, elect_unweighted: bool,
) -> Tensor:
    b = base.to(_F32)
    index = torch.arange(b.numel(), device=b.device) if kind == "random" else None
    deltas = []
    for i, x in enumerate(xs):
        delta = x.to(_F32) - b
        if kind == "band":
            magnitude = delta.abs()
            delta = torch.where((magnitude >= lo[i]) & (magnitude <= hi[i]), delta, 0.0)
        elif kind == "random":
            delta = torch.where(rng.random_bits(keys[i], index) < cutoffs[i], delta, 0.0)
        deltas.append(delta)
    weighted = [delta * coefs[i] for i, delta in enumerate(deltas)]
    if not consensus:
        return b + lam * _sum(weighted)
    # the eager loop's election (see task_vector._elect_unweighted)
    positive = _sum(deltas if elect_unweighted else weighted) >= 0
    mixed = torch.zeros_like(b)
    divisor = torch.zeros_like(b)
    for i, w in enumerate(weighted):
        agrees = torch.where(positive, w > 0, w < 0)
        mixed = mixed + torch.where(agrees, w, 0.0)
        divisor = divisor + torch.where(agrees, weights[i], 0.0)
    if normalize:
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return b + lam * mixed


def _sum(terms: list[Tensor]) -> Tensor:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _use_compile(t: Tensor) -> bool:
    mode = os.environ.get("EVOMERGE_COMPILE", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    return not _broken and t.device.type == "cuda" and t.numel() >= _MIN_NUMEL


def _give_up() -> None:
    global _broken
    _broken = True
    log.warning(
        "torch.compile failed for the merge kernels; merging without it (slower on a GPU). "
        "Set EVOMERGE_COMPILE=1 to see the error, or EVOMERGE_COMPILE=0 to silence this.",
        exc_info=True,
    )
