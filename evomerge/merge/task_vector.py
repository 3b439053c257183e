"""The generalized task-vector kernel; task_arithmetic, ties, dare_* and breadcrumbs*
are presets of it (a sparsification rule, sign consensus on or off, default flags).

    tau_i  = theta_i - theta_0                         per source model i
    tau_i' = keep_i * tau_i * rescale_i                 sparsification (optional)
    mixed  = sum_i w_i tau_i'  [over the models agreeing with the elected sign]
    mixed /= sum_i w_i         [over the same models; when normalize]
    result = theta_0 + lambda * mixed

Sign election (TIES) uses the sign of sum_i w_i tau_i', >= 0 counting as +; a zero
entry agrees with neither sign, so it is left out of the divisor; a zero divisor
becomes 1. Without consensus a divisor |sum w| < 1e-8 becomes 1. These are mergekit's
conventions.

Speed: everything after the per-model scalars (thresholds, rescale factors) is one
elementwise pass over the inputs. Large tensors run it through ``torch.compile``, which
fuses it into a single loop (DARE's random numbers are generated inside it, never
stored); ``EVOMERGE_COMPILE=0`` turns that off, ``=1`` forces it (and lets compile
errors surface). Otherwise the same function runs eagerly over cache-sized chunks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.merge import rng, sparsify

log = logging.getLogger(__name__)

SORTED_ABS = "sorted_abs"  # optional per-model entry: sparsify.sorted_abs_delta(source, base)
SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers")

_F32 = torch.float32
_EAGER_CHUNK = 1 << 20  # elements per eager step: temporaries stay in cache
_COMPILE_MIN_NUMEL = 1 << 20  # below this a compiled call saves less than it costs
_compiled: dict[Callable, Callable] = {}
_compile_broken = False


def merge(
    tensors: Sequence[Tensor],
    base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    seed: int = 0,
    *,
    sparsification: str | None,
    consensus: bool,
) -> Tensor:
    """One tensor of the merge; parameters already validated and defaulted."""
    if not tensors:
        return base.to(_F32, copy=True)
    device = base.device
    # detach() drops the view's link to its N-d base (torch.compile would otherwise
    # recompile for every new weight shape) and any autograd history of parameters.
    flat_base = base.reshape(-1).detach()
    flat = [x.reshape(-1).detach() for x in tensors]

    weights = _vector([mp["weight"] for mp in model_params], device)
    kind, lo, hi, keys, cutoffs = _keep_rule(sparsification, flat, flat_base, model_params, seed)
    scales = _rescales(params.get("rescale", "none"), kind, flat, flat_base, model_params, lo, hi, keys, cutoffs)
    total = sum(float(mp["weight"]) for mp in model_params)
    inv_divisor = _vector([1.0 if abs(total) < 1e-8 else 1.0 / total], device)[0]
    lam = _vector([params.get("lambda", 1.0)], device)[0]

    out = _map(
        _fused_merge, flat_base, flat, weights, lo, hi, keys, cutoffs, weights * scales, lam, inv_divisor,
        kind=kind, consensus=consensus, normalize=bool(params["normalize"]),
    )
    return out.view(base.shape)


def _vector(values: Sequence[float], device: torch.device) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=_F32, device=device)


def _keep_rule(
    sparsification: str | None,
    flat: Sequence[Tensor],
    flat_base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
    seed: int,
) -> tuple[str, Tensor, Tensor, Tensor, Tensor]:
    """The per-model scalars of the keep test: (kind, lo, hi, keys, cutoffs)."""
    device, n_models = flat_base.device, len(flat)
    lo = torch.zeros(n_models, device=device)
    hi = torch.full((n_models,), math.inf, device=device)
    keys = torch.zeros(n_models, dtype=torch.int64, device=device)
    cutoffs = torch.zeros(n_models, dtype=torch.int64, device=device)
    densities = [float(mp.get("density", 1.0)) for mp in model_params]
    if sparsification is None or all(d >= 1 for d in densities):
        return "all", lo, hi, keys, cutoffs
    if sparsification == "random":
        keys[:] = torch.tensor([rng.stream_key(seed, i) for i in range(n_models)])
        cutoffs[:] = torch.tensor([rng.keep_cutoff(d) for d in densities])
        return "random", lo, hi, keys, cutoffs
    for i, (x, mp) in enumerate(zip(flat, model_params)):
        if densities[i] >= 1:
            continue
        sorted_abs = mp.get(SORTED_ABS)
        magnitudes = None if sorted_abs is not None else sparsify.abs_delta(x, flat_base)
        if sparsification == "magnitude":
            lo[i] = sparsify.magnitude_threshold(magnitudes, densities[i], sorted_abs)
        elif sparsification == "magnitude_outliers":
            lo[i], hi[i] = sparsify.breadcrumbs_band(magnitudes, densities[i], float(mp["gamma"]), sorted_abs)
        else:
            raise ValueError(f"unknown sparsification {sparsification!r}; known: {SPARSIFICATIONS}")
    return "band", lo, hi, keys, cutoffs


def _rescales(
    rescale: str,
    kind: str,
    flat: Sequence[Tensor],
    flat_base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
    lo: Tensor, hi: Tensor, keys: Tensor, cutoffs: Tensor,
) -> Tensor:
    """Per-model factors applied to the kept entries (1 where nothing was dropped)."""
    scales = torch.ones(len(flat), device=flat_base.device)
    if kind == "all" or rescale == "none":
        return scales
    for i, mp in enumerate(model_params):
        density = float(mp.get("density", 1.0))
        if density >= 1:
            continue
        if rescale == "inverse_density":
            scales[i] = 1.0 / density
        elif rescale == "l1":
            sums = _reduce(_masked_l1, flat_base, [flat[i]], lo[i], hi[i], keys[i], cutoffs[i], kind=kind)
            scales[i] = sparsify.l1_rescale(sums[0], sums[1])
        else:
            raise ValueError(f"unknown rescale {rescale!r}; known: {sparsify.RESCALES}")
    return scales


def _keep(delta: Tensor, lo: Tensor, hi: Tensor, key: Tensor, cutoff: Tensor, offset: int, kind: str) -> Tensor:
    if kind == "band":
        return sparsify.band_keep(delta.abs(), lo, hi)
    index = torch.arange(offset, offset + delta.numel(), device=delta.device)
    return sparsify.dare_keep(index, key, cutoff)


def _fused_merge(
    base: Tensor, xs: Sequence[Tensor], weights: Tensor, lo: Tensor, hi: Tensor, keys: Tensor,
    cutoffs: Tensor, coefs: Tensor, lam: Tensor, inv_divisor: Tensor,
    *, offset: int, kind: str, consensus: bool, normalize: bool,
) -> Tensor:
    """The whole kernel after the per-model scalars, on flat slices; ``coefs`` holds
    weight * rescale per model."""
    b = base.to(_F32)
    weighted = []
    for i, x in enumerate(xs):
        delta = x.to(_F32) - b
        if kind != "all":
            delta = delta * _keep(delta, lo[i], hi[i], keys[i], cutoffs[i], offset, kind)
        weighted.append(delta * coefs[i])
    mixed = weighted[0]
    for w in weighted[1:]:
        mixed = mixed + w
    if consensus:
        elected = (mixed >= 0).to(_F32) * 2 - 1
        mixed, divisor = torch.zeros_like(b), torch.zeros_like(b)
        for i, w in enumerate(weighted):
            agrees = ((w * elected) > 0).to(_F32)
            mixed = mixed + w * agrees
            divisor = divisor + weights[i] * agrees
        if normalize:
            mixed = mixed / (divisor + (divisor == 0).to(_F32))
    elif normalize:
        mixed = mixed * inv_divisor
    return b + lam * mixed


def _masked_l1(
    base: Tensor, xs: Sequence[Tensor], lo: Tensor, hi: Tensor, key: Tensor, cutoff: Tensor,
    *, offset: int, kind: str,
) -> Tensor:
    """[L1 norm of the delta, L1 norm of its kept entries] for one model (xs has one)."""
    magnitude = (xs[0].to(_F32) - base.to(_F32)).abs()
    kept = magnitude * _keep(magnitude, lo, hi, key, cutoff, offset, kind)
    return torch.stack([magnitude.sum(), kept.sum()])


def _map(fn: Callable, base: Tensor, xs: Sequence[Tensor], *args: Any, **static: Any) -> Tensor:
    """``fn`` (one float32 value per element) over flat inputs: compiled, or in chunks."""
    compiled = _try_compiled(fn, base, xs, *args, **static)
    if compiled is not None:
        return compiled
    out = torch.empty(base.numel(), dtype=_F32, device=base.device)
    for start, stop in _chunks(base.numel()):
        out[start:stop] = fn(base[start:stop], [x[start:stop] for x in xs], *args, offset=start, **static)
    return out


def _reduce(fn: Callable, base: Tensor, xs: Sequence[Tensor], *args: Any, **static: Any) -> Tensor:
    """``fn`` (a small vector of sums) over flat inputs: compiled, or summed over chunks."""
    compiled = _try_compiled(fn, base, xs, *args, **static)
    if compiled is not None:
        return compiled
    parts = [
        fn(base[start:stop], [x[start:stop] for x in xs], *args, offset=start, **static)
        for start, stop in _chunks(base.numel())
    ]
    return torch.stack(parts).sum(dim=0)


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + _EAGER_CHUNK, n)) for start in range(0, n, _EAGER_CHUNK)]


def _try_compiled(fn: Callable, base: Tensor, xs: Sequence[Tensor], *args: Any, **static: Any) -> Tensor | None:
    """The compiled call's result, or None when compiling is off, pointless or broken."""
    if not _use_compile(base.numel()):
        return None
    from torch._dynamo.exc import TorchDynamoException  # loaded only when compiling

    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[fn](base, xs, *args, offset=0, **static)
    except TorchDynamoException:
        if os.environ.get("EVOMERGE_COMPILE") == "1":
            raise
        _give_up_compiling()
        return None


def _use_compile(numel: int) -> bool:
    mode = os.environ.get("EVOMERGE_COMPILE", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    return not _compile_broken and numel >= _COMPILE_MIN_NUMEL


def _give_up_compiling() -> None:
    global _compile_broken
    _compile_broken = True
    log.warning(
        "torch.compile failed for the merge kernels; merging without it (slower). "
        "Set EVOMERGE_COMPILE=1 to see the error, or EVOMERGE_COMPILE=0 to silence this.",
        exc_info=True,
    )
