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
conventions, and on the eager path so is the float32 arithmetic, in its order: each
kept delta times its rescale factor, then times its weight (two roundings, as mergekit
has them), the products summed model by model, divided by the divisor, times lambda,
added to the base. So a float32 merge is mergekit 0.1.5's to the bit where their
masks agree (tests/test_mergekit.py); the compiled GPU path rounds in its own way.

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
SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "della")

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
    keep = _keep_rule(sparsification, flat, flat_base, model_params, seed, base.shape)
    weights = [float(mp["weight"]) for mp in model_params]
    scales = _rescales(params.get("rescale", "none"), keep, flat, flat_base, model_params)
    lam = float(params.get("lambda", 1.0))
    normalize = bool(params["normalize"])
    coefs = [w * s for w, s in zip(weights, scales)]
    fused_lam = lam
    if not consensus and normalize:
        total = sum(weights)
        fused_lam = lam / total if abs(total) >= 1e-8 else lam
    out = None if keep.kind == "mask" else fused.combine(flat_base, flat, kind=keep.kind, lo=keep.lo, hi=keep.hi, keys=keep.keys,
                        cutoffs=keep.cutoffs, coefs=coefs, elect_unweighted=_elect_unweighted(coefs),
                        weights=weights, lam=fused_lam, consensus=consensus, normalize=normalize)
    if out is None:
        out = _combine(flat_base, flat, keep, scales, weights, lam, consensus=consensus, normalize=normalize)
    return out.view(base.shape)


def _elect_unweighted(coefs: Sequence[float]) -> bool:
    """For the compiled kernel only: whether it elects the sign off the plain sum of the
    deltas. With equal positive coefficients that is the weighted sum's sign, and an exact
    cancellation (common between bf16 fine-tunes one step either side of the base) stays
    an exact zero, elected +, however a compiler fuses the products into the sum. The
    eager loop needs no such care: its products are rounded one by one before the sum,
    as mergekit's are, so exact negatives cancel to an exact zero there too."""
    return coefs[0] > 0 and all(c == coefs[0] for c in coefs)


@dataclass(frozen=True, eq=False)
class _Keep:
    """Which entries of each model's delta survive, as per-model scalars: a magnitude
    band lo <= |delta| <= hi, or a DARE draw (stream key, integer cutoff; on the CPU
    drawn once per tensor into packed bits); or, for DELLA, whose keep probability
    differs per entry, one explicit mask per model."""

    kind: str  # "all", "band", "random" or "mask"
    lo: tuple[float, ...]  # one entry per model in each
    hi: tuple[float, ...]
    keys: tuple[int, ...]
    cutoffs: tuple[int, ...]
    packed: np.ndarray | None = None  # sparsify.dare_keep_bits of every model
    masks: Tensor | None = None  # kind "mask": (models, numel) bool

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
        elif self.kind == "mask":
            deltas.mul_(self.masks[list(models), offset : offset + deltas.shape[1]])
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
    shape: torch.Size,
) -> _Keep:
    densities = [float(mp.get("density", 1.0)) for mp in model_params]
    if sparsification is None or all(d >= 1 for d in densities):
        return _Keep.make("all", len(flat))
    if sparsification == "della":
        masks = torch.ones(len(flat), flat_base.numel(), dtype=torch.bool, device=flat_base.device)
        for i, (x, mp) in enumerate(zip(flat, model_params)):
            if densities[i] < 1:
                delta = (x.to(_F32) - flat_base.to(_F32)).view(shape)
                masks[i] = sparsify.della_keep(delta, densities[i], float(mp["epsilon"]), rng.stream_key(seed, i))
        return _Keep.make("mask", len(flat), masks=masks)
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
            lo[i] = float(sparsify.magnitude_threshold(magnitudes, densities[i], min_keep=1))
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
    base: Tensor, xs: Sequence[Tensor], keep: _Keep, scales: Sequence[float], weights: Sequence[float],
    lam: float, *, consensus: bool, normalize: bool,
) -> Tensor:
    """base + lam * (the kept, rescaled, weighted deltas, summed over the agreeing models
    and, when normalizing, divided by their weights), chunk by chunk into one output, in
    mergekit's order of operations (see the module docstring).

    The models' deltas of a chunk are the rows of one matrix, so each step is one
    operation for all models, whatever their number.
    """
    n, n_models, device = base.numel(), len(xs), base.device
    step = min(_chunk_size(base), n)
    out = torch.empty(n, dtype=_F32, device=device)
    scale_column = torch.tensor(scales, dtype=_F32, device=device)[:, None] if any(s != 1 for s in scales) else None
    weight_column = torch.tensor(weights, dtype=_F32, device=device)[:, None]
    # Without consensus mergekit divides by the float32 sum of the weights (1 when it is
    # within 1e-8 of 0), a 1-element tensor: CUDA would turn division by a Python number
    # into a multiplication by its reciprocal, which rounds differently.
    total = weight_column.sum(dim=0)
    fixed_divisor = total if normalize and not consensus and abs(float(total)) >= 1e-8 else None
    # A sum of positive weights is 0 or at least the smallest weight, so clamping it there
    # (one operation) turns exactly the zeros into a nonzero divisor.
    zero_divisor_floor = min(weights) if min(weights) > 0 else None
    models = range(n_models)

    def run(first: int, last: int) -> None:
        work = torch.empty(2 * n_models + 4, step, dtype=_F32, device=device)
        ones = work[-1].fill_(1.0)
        for start, stop in threads.steps(first, last, step):
            m = stop - start
            deltas, scratch = work[:n_models, :m], work[n_models : 2 * n_models, :m]
            b, acc, sign = (row[:m] for row in work[2 * n_models : 2 * n_models + 3])
            b.copy_(base[start:stop])  # float32 once: the subtraction and the final sum reuse it
            keep.apply_(_deltas_into(deltas, xs, b, start, stop), start, scratch, models)
            if scale_column is not None:
                deltas.mul_(scale_column)
            weighted = deltas.mul_(weight_column)
            _sum_rows(weighted, out=acc)
            if consensus:
                # Elected sign: +1 where sum_i w_i delta_i >= 0. copysign sends -0 to -1, but a
                # -0 sum means every term is zero, and then nobody agrees either way.
                torch.copysign(ones[:m], acc, out=sign)
                agrees = torch.mul(weighted, sign, out=scratch).gt_(0)  # 1 where it agrees, else 0
                _sum_rows(weighted.mul_(agrees), out=acc)
                if normalize:
                    divisor = _sum_rows(agrees.mul_(weight_column), out=sign)
                    if zero_divisor_floor:  # positive weights: where nobody agrees acc is 0, and 0 / floor = 0 / 1
                        divisor.clamp_min_(zero_divisor_floor)
                    else:  # a zero divisor becomes 1
                        divisor.add_(torch.eq(divisor, 0, out=scratch[0]))
                    acc.div_(divisor)
            elif fixed_divisor is not None:
                acc.div_(fixed_divisor)
            if lam != 1:
                acc.mul_(lam)
            torch.add(b, acc, out=out[start:stop])

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
