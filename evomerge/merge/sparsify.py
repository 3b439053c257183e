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

import torch
from torch import Tensor

from evomerge.merge import rng

RESCALES = ("l1", "inverse_density", "none")
L1_EPS = 1e-7  # below this L1 norm a rescale would amplify noise, so mergekit skips it

_DIRECT_SELECT_MAX = 1 << 18  # kthvalue is cheap enough below this many elements
_SAMPLE_SIZE = 1 << 16


def kth_smallest(values: Tensor, rank: int) -> Tensor:
    """The ``rank``-th smallest (1-based) entry of a flat tensor, exactly, in O(n).

    ``torch.kthvalue`` on millions of entries costs several elementwise passes'
    worth of time, so a strided sample first brackets the answer, two counting passes
    confirm the bracket, and kthvalue runs only on the few entries inside it. A
    bracket the sample got wrong falls back to kthvalue on everything.
    """
    n = values.numel()
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} outside 1..{n}")
    if n <= _DIRECT_SELECT_MAX:
        return torch.kthvalue(values, rank).values
    sample = values[:: n // _SAMPLE_SIZE].sort().values
    m = sample.numel()
    p = rank / n
    margin = int(4.0 * math.sqrt(m * p * (1.0 - p))) + 16
    lo_at = math.floor(p * (m - 1)) - margin
    hi_at = math.ceil(p * (m - 1)) + margin
    lo = sample[lo_at] if lo_at > 0 else values.new_tensor(-math.inf)
    hi = sample[hi_at] if hi_at < m - 1 else values.new_tensor(math.inf)
    below = values < lo
    inside = values <= hi
    inside &= ~below
    n_below, n_inside = int(below.sum()), int(inside.sum())
    if not n_below < rank <= n_below + n_inside:
        return torch.kthvalue(values, rank).values
    if bool(lo == hi):
        return lo
    return torch.kthvalue(values[inside], rank - n_below).values


def sorted_abs_delta(source: Tensor, base: Tensor) -> Tensor:
    """|source - base| flattened and sorted ascending, in float32: compute it once per
    resident source tensor and pass it as ``sorted_abs`` to skip selection later."""
    return abs_delta(source, base).sort().values


def abs_delta(source: Tensor, base: Tensor) -> Tensor:
    """|source - base| flattened, in float32 (the values the magnitude rules rank)."""
    delta = source.reshape(-1).to(torch.float32) - base.reshape(-1).to(torch.float32)
    return delta.abs_()


def _order_stat(abs_values: Tensor | None, sorted_abs: Tensor | None, rank: int) -> Tensor:
    if sorted_abs is not None:
        return sorted_abs[rank - 1].to(torch.float32)
    return kth_smallest(abs_values, rank)


def _numel(delta: Tensor | None, sorted_abs: Tensor | None) -> int:
    if delta is None and sorted_abs is None:
        raise ValueError("need the delta or its sorted_abs")
    if delta is not None and sorted_abs is not None and delta.numel() != sorted_abs.numel():
        raise ValueError(f"sorted_abs has {sorted_abs.numel()} entries, delta {delta.numel()}")
    return (sorted_abs if delta is None else delta).numel()


def _flat_abs(delta: Tensor | None, sorted_abs: Tensor | None) -> Tensor | None:
    return None if sorted_abs is not None else delta.reshape(-1).to(torch.float32).abs()


def magnitude_threshold(
    delta: Tensor | None, density: float, sorted_abs: Tensor | None = None
) -> Tensor:
    """The k-th largest |delta| (k = int(density * numel)) as a 0-dim float32 tensor:
    keeping |delta| >= it keeps the k largest. 0 for density >= 1 (keep all), inf for
    k = 0 (keep none). ``delta`` may be None when ``sorted_abs`` is given."""
    n = _numel(delta, sorted_abs)
    device = (sorted_abs if delta is None else delta).device
    k = int(density * n)
    if density >= 1 or k >= n:
        return torch.zeros((), device=device)
    if k == 0:
        return torch.full((), math.inf, device=device)
    return _order_stat(_flat_abs(delta, sorted_abs), sorted_abs, n - k + 1)


def breadcrumbs_band(
    delta: Tensor | None, density: float, gamma: float, sorted_abs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(lo, hi) such that keeping lo <= |delta| <= hi drops the n_top largest and the
    n_bot smallest entries (mergekit's rule; see the module docstring)."""
    n = _numel(delta, sorted_abs)
    device = (sorted_abs if delta is None else delta).device
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
    abs_values = _flat_abs(delta, sorted_abs)
    lo = _order_stat(abs_values, sorted_abs, n_bot + 1) if n_bot else torch.zeros((), device=device)
    hi = _order_stat(abs_values, sorted_abs, n - n_top) if n_top else inf
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
