"""Which entries of a task vector survive: magnitude trim, DARE drop, breadcrumbs.

Each rule is split in two: a per-tensor part that turns the parameters into a few
scalars (a magnitude band, or a random cutoff), and an elementwise keep test that the
task-vector kernel evaluates inside its fused pass. The scalars of the magnitude rules
are order statistics of |delta|, found by exact O(n) selection, never by sorting the
tensor; a search can precompute ``sorted_abs_delta`` once per resident source and then
read thresholds off it for every candidate at no cost.

Conventions follow mergekit 0.1.x: k = int(density * numel) entries are kept; a
density of 1 keeps everything untouched; breadcrumbs removes n_top = int(gamma * numel)
largest entries and as many of the smallest as needed to reach k, giving back outliers
first when both do not fit. Ties at a threshold are all kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from evomerge.merge import rng

RESCALES = ("l1", "inverse_density", "none")
L1_EPS = 1e-7  # below this L1 norm a rescale would amplify noise, so mergekit skips it

_DIRECT_SELECT_MAX = 1 << 18  # kthvalue is cheap enough below this many elements
_SAMPLE_SIZE = 1 << 16


@dataclass(frozen=True)
class Ranked:
    """Read access to n values for selection, so the values need not be materialized
    (the task-vector kernel computes |source - base| on the fly, in fused passes)."""

    n: int
    device: torch.device
    strided: Callable[[int], Tensor]  # every step-th value
    count_below: Callable[[Tensor], int]  # how many values are < lo
    between: Callable[[Tensor, Tensor], Tensor]  # the values in [lo, hi], any order
    everything: Callable[[], Tensor]  # all values, flat


def ranked_values(values: Tensor) -> Ranked:
    """``Ranked`` access to a tensor of values."""
    flat = values.reshape(-1)
    return Ranked(
        n=flat.numel(),
        device=flat.device,
        strided=lambda step: flat[::step],
        # count_nonzero, not sum: summing a bool tensor widens it to int64 (10x slower)
        count_below=lambda lo: int(torch.count_nonzero(flat < lo)),
        between=lambda lo, hi: flat[(flat >= lo) & (flat <= hi)],
        everything=lambda: flat,
    )


def kth_smallest(values: Ranked, rank: int) -> Tensor:
    """The ``rank``-th smallest (1-based) of the values, exactly, in O(n), as a 0-dim tensor.

    ``torch.kthvalue`` on millions of entries costs many elementwise passes' worth of
    time, so a strided sample first brackets the answer, a counting pass and an
    extraction pass confirm the bracket, and kthvalue runs only on the few values
    inside it. A bracket the sample got wrong falls back to kthvalue on everything.
    """
    n = values.n
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} outside 1..{n}")
    if n <= _DIRECT_SELECT_MAX:
        return torch.kthvalue(values.everything(), rank).values
    sample = values.strided(n // _SAMPLE_SIZE).sort().values
    m = sample.numel()
    p = rank / n
    margin = int(4.0 * math.sqrt(m * p * (1.0 - p))) + 16
    lo_at = math.floor(p * (m - 1)) - margin
    hi_at = math.ceil(p * (m - 1)) + margin
    lo = sample[lo_at] if lo_at > 0 else sample.new_tensor(-math.inf)
    hi = sample[hi_at] if hi_at < m - 1 else sample.new_tensor(math.inf)
    n_below = values.count_below(lo) if lo_at > 0 else 0
    inside = values.between(lo, hi)
    if not n_below < rank <= n_below + inside.numel():
        return torch.kthvalue(values.everything(), rank).values
    if bool(lo == hi):
        return lo
    return torch.kthvalue(inside, rank - n_below).values


def sorted_abs_delta(source: Tensor, base: Tensor) -> Tensor:
    """|source - base| flattened and sorted ascending, in float32: compute it once per
    resident source tensor and pass it as ``sorted_abs`` to skip selection later."""
    magnitudes = abs_delta(source, base)
    # Non-negative floats order like their int32 bit patterns, and CPU torch sorts
    # int32 several times faster than float32.
    return magnitudes.view(torch.int32).sort().values.view(torch.float32)


def abs_delta(source: Tensor, base: Tensor) -> Tensor:
    """|source - base| flattened, in float32 (the values the magnitude rules rank)."""
    delta = source.reshape(-1).to(torch.float32, copy=True)
    delta.sub_(base.reshape(-1))  # in place, promoting a bf16 base on the fly: one allocation
    return delta.abs_()


def _ranked(delta: Tensor | None, sorted_abs: Tensor | None) -> Ranked | Tensor:
    if sorted_abs is not None:
        if delta is not None and delta.numel() != sorted_abs.numel():
            raise ValueError(f"sorted_abs has {sorted_abs.numel()} entries, delta {delta.numel()}")
        return sorted_abs
    if delta is None:
        raise ValueError("need the delta or its sorted_abs")
    return delta if isinstance(delta, Ranked) else ranked_values(delta.reshape(-1).to(torch.float32).abs())


def _order_stat(source: Ranked | Tensor, rank: int) -> Tensor:
    if isinstance(source, Ranked):
        return kth_smallest(source, rank)
    return source[rank - 1].to(torch.float32)  # a sorted_abs


def _size(source: Ranked | Tensor) -> tuple[int, torch.device]:
    return (source.n, source.device) if isinstance(source, Ranked) else (source.numel(), source.device)


def magnitude_threshold(
    delta: Tensor | Ranked | None, density: float, sorted_abs: Tensor | None = None
) -> Tensor:
    """The k-th largest |delta| (k = int(density * numel)) as a 0-dim float32 tensor:
    keeping |delta| >= it keeps the k largest. 0 for density >= 1 (keep all), inf for
    k = 0 (keep none). ``delta`` may be None when ``sorted_abs`` is given, or ``Ranked``
    access to |delta|."""
    source = _ranked(delta, sorted_abs)
    n, device = _size(source)
    k = int(density * n)
    if density >= 1 or k >= n:
        return torch.zeros((), device=device)
    if k == 0:
        return torch.full((), math.inf, device=device)
    return _order_stat(source, n - k + 1)


def breadcrumbs_band(
    delta: Tensor | Ranked | None, density: float, gamma: float, sorted_abs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(lo, hi) such that keeping lo <= |delta| <= hi drops the n_top largest and the
    n_bot smallest entries (mergekit's rule; see the module docstring). Arguments as
    for ``magnitude_threshold``."""
    source = _ranked(delta, sorted_abs)
    n, device = _size(source)
    inf = torch.full((), math.inf, device=device)
    target = int(density * n)
    if density >= 1:
        return torch.zeros((), device=device), inf
    if target == 0:
        return inf, inf
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    lo = _order_stat(source, n_bot + 1) if n_bot else torch.zeros((), device=device)
    hi = _order_stat(source, n - n_top) if n_top else inf
    return lo, hi


def band_keep(abs_delta_values: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The keep mask of the magnitude rules (bool)."""
    return (abs_delta_values >= lo) & (abs_delta_values <= hi)


def dare_keep(index: Tensor, key: int | Tensor, cutoff: int | Tensor) -> Tensor:
    """DARE's Bernoulli keep mask (bool) for the elements at ``index``: kept with
    probability cutoff / 2**24 (see ``rng.keep_cutoff``), the same on every device."""
    return rng.random_bits(key, index) < cutoff


def l1_rescale(l1_before: Tensor, l1_after: Tensor) -> Tensor:
    """The factor that gives the kept entries the L1 norm of the whole delta; 1 when
    either norm is too small to divide by (mergekit's guard)."""
    ok = (l1_before >= L1_EPS) & (l1_after >= L1_EPS)
    return torch.where(ok, l1_before / torch.where(ok, l1_after, 1.0), 1.0)
