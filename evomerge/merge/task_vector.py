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

Speed: the per-model scalars (thresholds, rescale factors) come first; then one pass
over cache-sized chunks does the rest. In a chunk the models' deltas are the rows of
one matrix, so each step is one in-place operation for all models, on a small workspace
allocated once per call: the only full-size allocation is the output. On a CPU memory
traffic, not arithmetic, sets the cost, and a fresh full-size temporary costs page
faults worth several passes; with several threads the chunks are shared out among them
(``threads``). The torch.compile'd loop this replaced took as long per pass once warm on
the bench family, and its first call took ~6 s in every new process; on a GPU, where it
does pay, ``fused`` runs the same combine compiled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import fused, rng, sparsify, threads

SORTED_ABS = "sorted_abs"  # optional per-model entry: sparsify.sorted_abs_delta(source, base)
SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers")

_F32 = torch.float32
# Elements per step: on a CPU the workspace (2 * n_models + 5 rows of it) stays in cache
# while each call's fixed cost (~3 us) stays small; on a GPU larger steps amortize launches.
_CPU_CHUNK = 1 << 17
_GPU_CHUNK = 1 << 24


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
    flat_base = base.detach().reshape(-1)
    flat = [x.detach().reshape(-1) for x in tensors]
    keep = _keep_rule(sparsification, flat, flat_base, model_params, seed)
    weights = [float(mp["weight"]) for mp in model_params]
    scales = _rescales(params.get("rescale", "none"), keep, flat, flat_base, model_params)
    lam = float(params.get("lambda", 1.0))
    if not consensus and params["normalize"]:
        total = sum(weights)
        lam = lam / total if abs(total) >= 1e-8 else lam
    coefs = [w * s for w, s in zip(weights, scales)]
    normalize = bool(params["normalize"])
    out = fused.combine(flat_base, flat, kind=keep.kind, lo=keep.lo, hi=keep.hi, keys=keep.keys,
                        cutoffs=keep.cutoffs, coefs=coefs, elect_unweighted=_elect_unweighted(coefs),
                        weights=weights, lam=lam, consensus=consensus, normalize=normalize)
    if out is None:
        out = _combine(flat_base, flat, keep, coefs, weights, lam, consensus=consensus, normalize=normalize)
    return out.view(base.shape)


def _pre_scale(coefs: Sequence[float]) -> bool:
    """Agreement is read off the signs of the unweighted deltas when every coefficient is
    positive; otherwise the coefficients are applied first."""
    return any(c <= 0 for c in coefs)


def _elect_unweighted(coefs: Sequence[float]) -> bool:
    """Whether the elected sign is read off the plain sum of the deltas: with equal positive
    coefficients it is the weighted sum's, and an exact cancellation (common between bf16
    fine-tunes one step either side of the base) stays an exact zero, elected +, however
    products would round or fuse. Otherwise the weighted deltas are summed as products
    first, in order, which is mergekit's rounding."""
    return coefs[0] > 0 and all(c == coefs[0] for c in coefs)


@dataclass(frozen=True, eq=False)
class _Keep:
    """Which entries of each model's delta survive, as per-model scalars: a magnitude
    band lo <= |delta| <= hi, or a DARE draw (stream key, integer cutoff; on the CPU
    drawn once per tensor into packed bits)."""

    kind: str  # "all", "band" or "random"
    lo: tuple[float, ...]  # one entry per model in each
    hi: tuple[float, ...]
    keys: tuple[int, ...]
    cutoffs: tuple[int, ...]
    packed: np.ndarray | None = None  # sparsify.dare_keep_bits of every model

    @classmethod
    def make(cls, kind: str, n_models: int, **given: Any) -> _Keep:
        """A rule for n models; the per-model fields not given keep everything."""
        keep_all = {"lo": (0.0,) * n_models, "hi": (math.inf,) * n_models,
                    "keys": (0,) * n_models, "cutoffs": (1 << rng.BITS,) * n_models}
        return cls(kind, **(keep_all | given))

    @functools.cached_property
    def shrink_lo(self) -> tuple[float, ...]:
        """hardshrink keeps |x| > lambda; the largest float32 below lo keeps |x| >= lo."""
        return tuple(float(np.nextafter(np.float32(lo), np.float32(0))) for lo in self.lo)

    def apply_(self, deltas: Tensor, offset: int, scratch: Tensor, models: Sequence[int]) -> Tensor:
        """Zero, in place, the dropped entries of ``deltas``: row r holds model models[r]'s
        delta over the elements from ``offset`` on; ``scratch`` has the same shape."""
        if self.kind == "band":
            for row, spare, i in zip(deltas, scratch, models):
                hi = self.hi[i]
                if hi < math.inf:  # breadcrumbs: the outliers above hi go too
                    torch.ops.aten.hardshrink.out(row, hi, out=spare)
                if self.lo[i] > 0:
                    torch.ops.aten.hardshrink.out(row, self.shrink_lo[i], out=row)
                if hi < math.inf:
                    row.sub_(spare)
        elif self.kind == "random" and self.packed is not None:
            deltas.mul_(sparsify.unpack_keep(self.packed, offset, offset + deltas.shape[1], models))
        elif self.kind == "random":
            index = torch.arange(offset, offset + deltas.shape[1], device=deltas.device)
            keys = torch.tensor([self.keys[i] for i in models], device=deltas.device)[:, None]
            cutoffs = torch.tensor([self.cutoffs[i] for i in models], device=deltas.device)[:, None]
            deltas.mul_(sparsify.dare_keep(index, keys, cutoffs).to(_F32))
        return deltas


def _keep_rule(
    sparsification: str | None,
    flat: Sequence[Tensor],
    flat_base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
    seed: int,
) -> _Keep:
    densities = [float(mp.get("density", 1.0)) for mp in model_params]
    if sparsification is None or all(d >= 1 for d in densities):
        return _Keep.make("all", len(flat))
    if sparsification == "random":
        keys = tuple(rng.stream_key(seed, i) for i in range(len(flat)))
        cutoffs = tuple(rng.keep_cutoff(d) for d in densities)
        on_cpu = flat_base.device.type == "cpu"
        packed = sparsify.dare_keep_bits(keys, cutoffs, flat_base.numel()) if on_cpu else None
        return _Keep.make("random", len(flat), keys=keys, cutoffs=cutoffs, packed=packed)
    if sparsification not in SPARSIFICATIONS:
        raise ValueError(f"unknown sparsification {sparsification!r}; known: {SPARSIFICATIONS}")
    lo, hi = [0.0] * len(flat), [math.inf] * len(flat)
    scratch = None  # |delta| of each model in turn, reordered in place by the selection
    for i, (x, mp) in enumerate(zip(flat, model_params)):
        if densities[i] >= 1:
            continue
        sorted_abs = mp.get(SORTED_ABS)
        if sorted_abs is None and scratch is None:
            scratch = torch.empty(flat_base.numel(), dtype=_F32, device=flat_base.device)
        magnitudes = (sparsify.Magnitudes.of_sorted(sorted_abs) if sorted_abs is not None
                      else sparsify.Magnitudes.of_delta(x, flat_base, scratch))
        if sparsification == "magnitude":
            lo[i] = float(sparsify.magnitude_threshold(magnitudes, densities[i]))
        else:
            lo[i], hi[i] = (float(v) for v in sparsify.breadcrumbs_band(magnitudes, densities[i], float(mp["gamma"])))
    return _Keep.make("band", len(flat), lo=tuple(lo), hi=tuple(hi))


def _rescales(
    rescale: str,
    keep: _Keep,
    flat: Sequence[Tensor],
    flat_base: Tensor,
    model_params: Sequence[Mapping[str, Any]],
) -> list[float]:
    """Per-model factors applied to the kept entries (1 where nothing was dropped)."""
    scales = [1.0] * len(flat)
    if keep.kind == "all" or rescale == "none":
        return scales
    sparse = [i for i, mp in enumerate(model_params) if float(mp.get("density", 1.0)) < 1]
    if rescale == "inverse_density":
        for i in sparse:
            scales[i] = 1.0 / float(model_params[i]["density"])
    elif rescale == "l1":
        before, after = _l1_norms([flat[i] for i in sparse], flat_base, keep, sparse)
        for j, i in enumerate(sparse):
            scales[i] = float(sparsify.l1_rescale(before[j], after[j]))
    else:
        raise ValueError(f"unknown rescale {rescale!r}; known: {sparsify.RESCALES}")
    return scales


def _l1_norms(xs: Sequence[Tensor], base: Tensor, keep: _Keep, models: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(L1 norms of the models' deltas, L1 norms of their kept entries), float32 within a
    chunk and float64 across chunks, so the sums barely depend on the chunk size."""
    n, device = base.numel(), base.device
    step = min(_chunk_size(base), n)

    def run(first: int, last: int) -> tuple[Tensor, Tensor]:
        work = torch.empty(2, len(xs), step, dtype=_F32, device=device)
        before = torch.zeros(len(xs), dtype=torch.float64, device=device)
        after = torch.zeros(len(xs), dtype=torch.float64, device=device)
        for start, stop in threads.steps(first, last, step):
            deltas, scratch = work[0, :, : stop - start], work[1, :, : stop - start]
            _deltas_into(deltas, xs, base[start:stop], start, stop)
            before += torch.abs(deltas, out=scratch).sum(dim=1)
            after += torch.abs(keep.apply_(deltas, start, scratch, models), out=scratch).sum(dim=1)
        return before, after

    parts = threads.map_ranges(run, n, step, device)
    return sum(p[0] for p in parts).to(_F32), sum(p[1] for p in parts).to(_F32)


def _chunk_size(t: Tensor) -> int:
    return _CPU_CHUNK if t.device.type == "cpu" else _GPU_CHUNK


def _combine(
    base: Tensor, xs: Sequence[Tensor], keep: _Keep, coefs: Sequence[float], weights: Sequence[float],
    lam: float, *, consensus: bool, normalize: bool,
) -> Tensor:
    """base + lam * (the kept, weighted deltas, summed over the agreeing models and, for
    consensus with normalize, divided by their weights), chunk by chunk into one output.

    The models' deltas of a chunk are the rows of one matrix, so each step is one
    operation for all models, whatever their number.
    """
    n, n_models, device = base.numel(), len(xs), base.device
    step = min(_chunk_size(base), n)
    out = torch.empty(n, dtype=_F32, device=device)
    coef_column = torch.tensor(coefs, dtype=_F32, device=device)[:, None]
    weight_vector = torch.tensor(weights, dtype=_F32, device=device)
    pre_scale = _pre_scale(coefs)
    coef_vector = torch.ones(n_models, dtype=_F32, device=device) if pre_scale else coef_column[:, 0]
    elect_unweighted = pre_scale or _elect_unweighted(coefs)  # pre-scaled deltas are the products
    # A sum of positive weights is 0 or at least the smallest weight, so clamping it there
    # (one operation) turns exactly the zeros into a nonzero divisor.
    zero_divisor_floor = min(weights) if min(weights) > 0 else None
    models = range(n_models)

    def run(first: int, last: int) -> None:
        work = torch.empty(2 * n_models + 5, step, dtype=_F32, device=device)
        ones = work[-1].fill_(1.0)
        for start, stop in threads.steps(first, last, step):
            m = stop - start
            deltas, scratch = work[:n_models, :m], work[n_models : 2 * n_models, :m]
            b, acc, sign, divisor = (row[:m] for row in work[2 * n_models : 2 * n_models + 4])
            b.copy_(base[start:stop])  # float32 once: the subtraction and the final sum reuse it
            keep.apply_(_deltas_into(deltas, xs, b, start, stop), start, scratch, models)
            if pre_scale:
                deltas.mul_(coef_column)
            if not consensus:
                torch.add(b, torch.mv(deltas.t(), coef_vector, out=acc), alpha=lam, out=out[start:stop])
                continue
            # Elected sign: +1 where sum_i c_i delta_i >= 0. copysign sends -0 to -1, but a -0
            # sum means every term is zero, and then nobody agrees either way.
            weighted = deltas if elect_unweighted else torch.mul(deltas, coef_column, out=scratch)
            torch.copysign(ones[:m], _sum_rows(weighted, out=acc), out=sign)
            agreeing = torch.mul(deltas, sign, out=scratch).relu_()  # |delta| where it agrees, else 0
            torch.mv(agreeing.t(), coef_vector, out=acc).mul_(sign)
            if not normalize:
                torch.add(b, acc, alpha=lam, out=out[start:stop])
                continue
            torch.mv(agreeing.sign_().t(), weight_vector, out=divisor)
            if zero_divisor_floor:  # positive weights: where nobody agrees acc is 0, and 0 / floor = 0 / 1
                divisor.clamp_min_(zero_divisor_floor)
            else:  # a zero divisor becomes 1
                divisor.add_(torch.eq(divisor, 0, out=sign))
            torch.addcdiv(b, acc, divisor, value=lam, out=out[start:stop])

    threads.map_ranges(run, n, step, device)
    return out


def _deltas_into(rows: Tensor, xs: Sequence[Tensor], base: Tensor, start: int, stop: int) -> Tensor:
    """Row i := xs[i][start:stop] - base (the base already sliced), in float32, in place."""
    for row, x in zip(rows, xs):
        row.copy_(x[start:stop])
    return rows.sub_(base)


def _sum_rows(rows: Tensor, out: Tensor) -> Tensor:
    """rows[0] + rows[1] + ... added in order, into ``out``."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
    return out
