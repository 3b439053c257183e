"""Git Re-Basin (Ainsworth et al. 2023): permute one model's units onto another's.

``weight_matching`` needs only the weights: coordinate descent over the groups,
each step an exact linear assignment given the other groups' permutations.
``activation_matching`` needs calibration tokens: one assignment per group on the
cross-correlation of the two models' activations at that group's sites.
Head groups are solved in two levels so grouped-query attention is respected:
every (kv slot, kv slot) pair gets its best query-head assignment, then the kv
slots are assigned on those totals, which is exact for the combined objective.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import UserError
from .activations import joint_moments
from .permspec import PermSpec, apply_permutation, check_names, identity_permutation, kv_perm, perm_spec


def _assign(sim: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(sim, maximize=True)[1]


def solve(sim: np.ndarray, sim_kv: np.ndarray | None, heads_per_kv: int) -> torch.Tensor:
    """The permutation maximizing sim[i, p[i]] (+ sim_kv[g, kv(p)[g]]) summed."""
    r = heads_per_kv
    if r == 1:
        return torch.as_tensor(_assign(sim if sim_kv is None else sim + sim_kv))
    slots = len(sim) // r
    blocks = sim.reshape(slots, r, slots, r)
    inner = np.empty((slots, slots, r), dtype=np.int64)
    total = np.zeros((slots, slots)) if sim_kv is None else sim_kv.copy()
    for g in range(slots):
        for h in range(slots):
            inner[g, h] = _assign(blocks[g, :, h, :])
            total[g, h] += blocks[g, np.arange(r), h, inner[g, h]].sum()
    outer = _assign(total)
    return torch.as_tensor(np.concatenate([outer[g] * r + inner[g, outer[g]] for g in range(slots)]))


def _score(sim, sim_kv, p: torch.Tensor, heads_per_kv: int) -> float:
    score = sim[np.arange(len(p)), p.numpy()].sum()
    if sim_kv is not None:
        kv = kv_perm(p, heads_per_kv).numpy()
        score += sim_kv[np.arange(len(kv)), kv].sum()
    return float(score)


def _units(t: torch.Tensor, axis, n: int) -> torch.Tensor:
    """[n, features] in float64: one row per permuted unit along ``axis``.

    float64 so that the gain test below sees the assignment, not rounding.
    """
    x = t.movedim(axis.dim, 0).reshape(axis.repeat, n, axis.unit, -1)
    return x.transpose(0, 1).reshape(n, -1).double()


def _weight_similarity(spec: PermSpec, group: str, names: list[str], ref, other, perms):
    """[n, n] unit similarities of ``group`` (and [kv, kv] of the kv heads it implies)."""
    n = spec.sizes[group]
    k = n // spec.heads_per_kv
    sim, sim_kv = torch.zeros(n, n, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    has_kv = False
    for name in names:
        (axis,) = [a for a in spec.axes[name] if a.group == group]
        moved = spec.permute(name, other[name], perms, skip=group)
        size = k if axis.kv else n
        (sim_kv if axis.kv else sim).add_(_units(ref[name], axis, size) @ _units(moved, axis, size).T)
        has_kv |= axis.kv
    r = spec.heads_per_kv if group.startswith("heads.") else 1
    return sim.numpy(), sim_kv.numpy() if has_kv else None, r


def float_pair(reference, other, spec: PermSpec):
    """Both states in float32, after checking they are one architecture at one size."""
    shapes = [{n: tuple(t.shape) for n, t in s.items()} for s in (reference, other)]
    if shapes[0] != shapes[1]:
        odd = next(n for n in sorted(shapes[0].keys() | shapes[1].keys()) if shapes[0].get(n) != shapes[1].get(n))
        raise UserError(f"the two models differ at tensor {odd!r}; alignment needs two models of one architecture and size")
    check_names(reference, spec)
    return {n: t.float() for n, t in reference.items()}, {n: t.float() for n, t in other.items()}


def weight_matching(reference, other, config: dict, max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations of ``other`` maximizing the summed inner product of its weights with ``reference``'s."""
    spec = perm_spec(config)
    ref, oth = float_pair(reference, other, spec)
    perms = identity_permutation(spec)
    touching = {g: [n for n in spec.touching(g) if n in ref] for g in spec.sizes}
    groups = list(spec.sizes)
    rng = random.Random(seed)
    for _ in range(max_iter):
        rng.shuffle(groups)
        improved = False
        for group in groups:
            sim, sim_kv, r = _weight_similarity(spec, group, touching[group], ref, oth, perms)
            new = solve(sim, sim_kv, r)
            # a gain this small is rounding, and chasing it could cycle
            old = _score(sim, sim_kv, perms[group], r)
            if _score(sim, sim_kv, new, r) - old > 1e-9 * abs(old) + 1e-12:
                perms[group], improved = new, True
        if not improved:
            break
    return perms


def _head_similarity(corr: torch.Tensor, heads: int) -> np.ndarray:
    """Query head i vs j: their dims' correlations summed, dim d with dim d."""
    d = len(corr) // 2
    cross = corr[:d, d:].reshape(heads, d // heads, heads, d // heads)
    return cross.diagonal(dim1=1, dim2=3).sum(-1).numpy()


def perms_from_moments(moments, spec: PermSpec) -> dict[str, torch.Tensor]:
    perms = {}
    for group, sites in moments.items():
        if group.startswith("heads."):
            sim = _head_similarity(sites[0].correlation(), spec.sizes[group])
            perms[group] = solve(sim, None, spec.heads_per_kv)
        else:
            n = spec.sizes[group]
            # one permutation serves every residual site, so it answers to all of them at once
            sim = sum(site.correlation()[:n, n:] for site in sites)
            perms[group] = solve(sim.numpy(), None, 1)
    return perms


def activation_matching(reference, other, config: dict, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Permutations of ``other`` maximizing the correlation of its activations with ``reference``'s.

    ``batches``: dicts of LongTensors ``input_ids`` and ``attention_mask`` [batch, tokens];
    masked tokens are left out of the statistics.
    """
    spec = perm_spec(config)
    ref, oth = float_pair(reference, other, spec)
    return perms_from_moments(joint_moments(ref, oth, config, spec, batches), spec)


def align(reference, other, config: dict, method: str = "weight", batches: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """``other`` permuted onto ``reference``: the same function, its units in ``reference``'s order."""
    if method == "weight":
        perms = weight_matching(reference, other, config)
    elif method == "activation":
        if not batches:
            raise ValueError("method='activation' needs calibration batches")
        perms = activation_matching(reference, other, config, batches)
    else:
        raise ValueError(f"method must be 'weight' or 'activation', not {method!r}")
    return apply_permutation(other, config, perms)

