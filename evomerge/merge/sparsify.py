"""Which entries of a task vector survive: magnitude trim, DARE drop, breadcrumbs.

Each rule is split in two: a per-tensor part that turns the parameters into a few
scalars (a magnitude band, or a random cutoff), and an elementwise keep test that the
task-vector kernel applies chunk by chunk in its single pass. The scalars of the
magnitude rules are order statistics of |delta|, found exactly and never by sorting the
tensor (``Magnitudes``); a search can precompute ``sorted_abs_delta`` once per resident
source and then read thresholds off it for every candidate at no cost.

Conventions follow mergekit 0.1.5: k = int(density * numel) entries are kept, and at
least one for the TIES trim (``magnitude_threshold``'s ``min_keep``); a density of 1
keeps everything untouched; breadcrumbs removes n_top = int(gamma * numel)
largest entries and as many of the smallest as needed to reach k, giving back outliers
first when both do not fit. Ties at a threshold are all kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evomerge.errors import UserError
from evomerge.merge import rng, threads

RESCALES = ("l1", "inverse_density", "none")
L1_EPS = 1e-7  # below this L1 norm a rescale would amplify noise, so mergekit skips it
_STEP = 1 << 17  # elements per CPU step of abs_delta: temporaries stay in cache


@dataclass(frozen=True)
class Magnitudes:
    """|source - base| of one tensor, for exact order statistics (``kth``).

    Built from whichever form is at hand: the sorted values (``sorted_abs_delta``,
    precomputed once per resident source), the values themselves, or the two tensors
    (then |delta| is computed into one scratch buffer that selection reorders in place).
    """

    numel: int
    sorted_abs: Tensor | None = None
    values: Tensor | None = None
    owned: bool = False
    source: Tensor | None = None
    base: Tensor | None = None
    scratch: Tensor | None = None

    @classmethod
    def of_sorted(cls, sorted_abs: Tensor) -> Magnitudes:
        return cls(sorted_abs.numel(), sorted_abs=sorted_abs)

    @classmethod
    def of_values(cls, values: Tensor, owned: bool = False) -> Magnitudes:
        """Flat non-negative float32 values; ``owned``: they may be reordered in place."""
        return cls(values.numel(), values=values.reshape(-1), owned=owned)

    @classmethod
    def of_delta(cls, source: Tensor, base: Tensor, scratch: Tensor | None = None) -> Magnitudes:
        """``scratch``: flat float32 of the same size to compute |delta| in (a merge reuses
        one for all its models: fresh memory costs page faults on every first touch)."""
        return cls(source.numel(), source=source.reshape(-1), base=base.reshape(-1), scratch=scratch)

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.sorted_abs, self.values, self.source) if t is not None).device

    def kth(self, ranks: Sequence[int]) -> list[Tensor]:
        """The ``ranks``-th smallest (1-based) magnitudes, exactly, as 0-dim float32 tensors."""
        for rank in ranks:
            if not 1 <= rank <= self.numel:
                raise ValueError(f"rank {rank} outside 1..{self.numel}")
        if not ranks:
            return []
        if self.sorted_abs is not None:
            return [self.sorted_abs[rank - 1].to(torch.float32) for rank in ranks]
        if self.values is not None:
            # partitioning in place keeps the multiset, so every later rank is still exact
            return [kth_smallest(self.values, rank, owned=self.owned) for rank in ranks]
        return Magnitudes.of_values(abs_delta(self.source, self.base, out=self.scratch), owned=True).kth(ranks)


def kth_smallest(values: Tensor, rank: int, owned: bool = False) -> Tensor:
    """The ``rank``-th smallest (1-based) of flat, non-negative float32 ``values``, exactly,
    in O(n), as a 0-dim tensor.

    On the CPU numpy's SIMD introselect (``np.partition``) runs about 20x faster than
    ``torch.kthvalue``, and faster still on the int32 bit patterns, which order like
    non-negative floats; elsewhere kthvalue runs on the device. Both are exact, so the
    threshold, and the merged tensor, do not depend on the device. ``owned``: the values
    are the caller's scratch, so they are reordered in place instead of copied.
    """
    n = values.numel()
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} outside 1..{n}")
    if values.device.type != "cpu":
        return torch.kthvalue(values.reshape(-1), rank).values
    bits = values.detach().reshape(-1).view(torch.int32).numpy()
    if not owned:
        bits = bits.copy()
    bits.partition(rank - 1)
    return torch.tensor(int(bits[rank - 1]), dtype=torch.int32).view(torch.float32)


def sorted_abs_delta(source: Tensor, base: Tensor) -> Tensor:
    """|source - base| flattened and sorted ascending, in float32: compute it once per
    resident source tensor and pass it as ``sorted_abs`` to skip selection later."""
    return sort_nonnegative(abs_delta(source, base))


def sort_nonnegative(values: Tensor) -> Tensor:
    """Ascending sort of non-negative float32 values, by their int32 bit patterns (which
    order like the values). On the CPU numpy's SIMD sort, ~6x faster than torch's on int32
    here (bench/RESULTS.md, seventh session); on a device, torch's."""
    bits = values.contiguous().view(torch.int32)
    if bits.device.type != "cpu":
        return bits.sort().values.view(torch.float32)
    return torch.from_numpy(np.sort(bits.numpy(), axis=-1)).view(torch.float32)


def abs_delta(source: Tensor, base: Tensor, out: Tensor | None = None) -> Tensor:
    """|source - base| flattened, in float32 (the values the magnitude rules rank),
    written into ``out`` (flat float32 of the same size) when given. Done in
    cache-sized steps: a whole-tensor subtraction of a bf16 base would first
    materialize a float32 copy of it."""
    n = source.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=source.device)
    src, ref = source.reshape(-1), base.reshape(-1)

    def run(first: int, last: int) -> None:
        step = _STEP if source.device.type == "cpu" else max(n, 1)
        for start, stop in threads.steps(first, last, step):
            out[start:stop].copy_(src[start:stop]).sub_(ref[start:stop]).abs_()

    threads.map_ranges(run, n, _STEP, source.device)
    return out


def magnitude_threshold(magnitudes: Magnitudes, density: float, min_keep: int = 0) -> Tensor:
    """The k-th largest magnitude (k = max(min_keep, int(density * numel))) as a 0-dim
    float32 tensor: keeping |delta| >= it keeps the k largest. 0 for density >= 1 (keep
    all), inf for k = 0 (keep none). The TIES kernel passes ``min_keep=1``: mergekit
    0.1.5 keeps at least one entry of a tensor at any positive density (a 32-entry norm
    at density 0.02 keeps its largest entry, not none)."""
    n = magnitudes.numel
    k = max(min_keep, int(density * n))
    if density >= 1 or k >= n:
        return torch.zeros((), device=magnitudes.device)
    if k == 0:
        return torch.full((), math.inf, device=magnitudes.device)
    return magnitudes.kth([n - k + 1])[0]


def breadcrumbs_band(magnitudes: Magnitudes, density: float, gamma: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) such that keeping lo <= |delta| <= hi drops the n_top largest and the
    n_bot smallest entries (mergekit's rule; see the module docstring)."""
    n, device = magnitudes.numel, magnitudes.device
    zero, inf = torch.zeros((), device=device), torch.full((), math.inf, device=device)
    target = int(density * n)
    if density >= 1:
        return zero, inf
    if target == 0:
        return inf, inf
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ranks = ([n_bot + 1] if n_bot else []) + ([n - n_top] if n_top else [])
    found = iter(magnitudes.kth(ranks))
    lo = next(found) if n_bot else zero
    hi = next(found) if n_top else inf
    return lo, hi


def dare_keep(index: Tensor, key: int | Tensor, cutoff: int | Tensor) -> Tensor:
    """DARE's Bernoulli keep mask (bool) for the elements at ``index``: kept with
    probability cutoff / 2**24 (see ``rng.keep_cutoff``), the same on every device."""
    return rng.random_bits(key, index) < cutoff


def della_keep(delta: Tensor, density: float, epsilon: float, key: int, index: Tensor | None = None) -> Tensor:
    """DELLA's MagPrune keep mask (Deep et al. 2024), flat bool: within each row (the last
    axes after the first; a 1-D tensor is one row) an entry of magnitude rank r among n
    (0 = smallest) is kept with probability density - epsilon + 2 * epsilon * r / (n - 1),
    so larger changes survive more often and the mean keep rate is ``density``; drawn
    from the counter-based hash as DARE's mask is. mergekit 0.1.5 ranks along dim 1 the
    same way.

    DELLA needs each row's order, so one sort per row (of the int32 bit patterns, which
    order like non-negative floats and sort several times faster); the draws are compared
    in sorted order with one cutoff per rank and scattered back, so no second sort turns
    orders into ranks; blocks of rows run on all threads. ``index``: each entry's element
    index for the hash, when ``delta`` is a reordered view (default: its own order)."""
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise UserError(f"della: density {density:g} +/- epsilon {epsilon:g} must lie inside (0, 1); "
                        "lower epsilon or move density away from 0 and 1")
    if delta.dim() > 2:  # rows run along dim 1: move it last so every row is contiguous
        moved = delta.movedim(1, -1)
        flat_index = torch.arange(delta.numel(), device=delta.device).view(delta.shape).movedim(1, -1).reshape(-1)
        keep = torch.empty(moved.numel(), dtype=torch.bool, device=delta.device)
        keep[flat_index] = della_keep(moved.reshape(-1, delta.shape[1]), density, epsilon, key, flat_index)
        return keep
    rows = delta if delta.dim() == 2 else delta.reshape(1, -1)
    n_rows, n = rows.shape
    spread = torch.arange(n, dtype=torch.float32, device=rows.device) / max(n - 1, 1)
    cutoffs = torch.round(((density - epsilon) + spread * (2 * epsilon)) * (1 << rng.BITS)).to(torch.int32)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)

    def run(first: int, last: int) -> None:  # rows first..last-1, each sorted on its own
        if index is not None:
            bits = rng.random_bits(key, index[first * n : last * n]).to(torch.int32)
        elif rows.device.type == "cpu":
            bits = torch.from_numpy(rng.random_bits_range([key], first * n, last * n)[0].view(np.int32))
        else:
            bits = rng.random_bits(key, torch.arange(first * n, last * n, device=rows.device)).to(torch.int32)
        bits = bits.view(last - first, n)
        order = rows[first:last].abs().to(torch.float32).contiguous().view(torch.int32).sort(dim=1, stable=True).indices
        keep[first:last].scatter_(1, order, bits.gather(1, order) < cutoffs)

    threads.map_ranges(run, n_rows, max(1, _STEP // n), rows.device)
    return keep.reshape(-1)


def dare_keep_bits(keys: Sequence[int], cutoffs: Sequence[int], n: int) -> np.ndarray:
    """``dare_keep`` of elements 0..n-1 for several (key, cutoff) pairs, computed on the
    CPU and packed 8 to a byte: a (len(keys), ceil(n / 8)) uint8 array (``unpack_keep``
    reads a slice back). Drawn once per tensor, a mask serves the L1 rescale's pass and
    the merge's without hashing twice, at 1/32 of a float mask's memory."""
    packed = np.empty((len(keys), (n + 7) // 8), dtype=np.uint8)
    limits = np.asarray(cutoffs, dtype=np.uint32)[:, None]

    def run(first: int, last: int) -> None:
        for start, stop in threads.steps(first, last, _STEP):  # _STEP is a multiple of 8: byte-aligned
            keep = rng.random_bits_range(keys, start, stop) < limits
            packed[:, start // 8 : (stop + 7) // 8] = np.packbits(keep, axis=1)

    threads.map_ranges(run, n, _STEP)
    return packed


def unpack_keep(packed: np.ndarray, start: int, stop: int, rows: Sequence[int] | None = None) -> Tensor:
    """Elements start..stop-1 of ``dare_keep_bits`` masks (those of ``rows``, default all),
    as a float32 tensor of 0s and 1s (multiplying by it is several times faster than by
    a bool mask, or than masked_fill_)."""
    first = start // 8 * 8
    block = packed[:, first // 8 : (stop + 7) // 8]
    bits = np.unpackbits(block if rows is None else block[list(rows)], axis=1, count=stop - first)
    return torch.from_numpy(bits[:, start - first :].astype(np.float32))


def l1_rescale(l1_before: Tensor, l1_after: Tensor) -> Tensor:
    """The factor that gives the kept entries the L1 norm of the whole delta; 1 when
    either norm is too small to divide by (mergekit's guard)."""
    ok = (l1_before >= L1_EPS) & (l1_after >= L1_EPS)
    return torch.where(ok, l1_before / torch.where(ok, l1_after, 1.0), 1.0)
