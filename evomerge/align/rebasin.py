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
from .residual import fold_norms, gains_invertible, procrustes, residual_rotation, rotate_residual, unfold_norms
from .residual import is_identity as residual_is_identity
from .residual import supports as residual_supported
from .rotations import align_heads, head_rotations, rotate_heads
from .rotations import supports as rotations_supported
from .permspec import RESIDUAL, PermSpec, apply_permutation, check_names, identity_permutation, kv_perm, perm_spec


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


def _circuit_similarity(spec: PermSpec, group: str, ref, other, perms):
    """[heads, heads] similarities of query heads that no within-head rotation changes.

    Each head is compared by its two circuits, which the rotations of ``rotations`` leave
    alone: OV = W_o[:, h] W_v[kv(h)] and QK = W_q[h]^T W_k[kv(h)] (Elhage et al. 2021);
    <OV_a, OV_b> = sum((W_o,a^T W_o,b) * (W_v,a W_v,b^T)), likewise for QK.
    """
    layer = group.split(".", 1)[1]
    p = f"model.layers.{layer}.self_attn."
    heads, r = spec.sizes[group], spec.heads_per_kv
    d = ref[p + "o_proj.weight"].shape[1] // heads

    def blocks(state, proj, moved):
        t = spec.permute(p + proj + ".weight", state[p + proj + ".weight"], perms, skip=group) if moved else state[p + proj + ".weight"]
        t = t.double().T if proj == "o_proj" else t.double()  # o_proj: its columns, one block per head
        return t.reshape(-1, d, t.shape[1])  # [heads or kv heads, d, hidden]

    q, k, v, o = (blocks(ref, n, False) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    q2, k2, v2, o2 = (blocks(other, n, True) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    kv = torch.arange(heads) // r
    ov = torch.einsum("adi,bei->abde", o, o2) * torch.einsum("adi,bei->abde", v[kv], v2[kv])
    qk = torch.einsum("adi,bei->abde", q, q2) * torch.einsum("adi,bei->abde", k[kv], k2[kv])
    return (ov + qk).sum((2, 3)).numpy(), None, r


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


def weight_matching(reference, other, config: dict, max_iter: int = 100, seed: int = 0,
                    rotations: bool = False, fixed: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Permutations of ``other`` maximizing the summed inner product of its weights with ``reference``'s.

    ``rotations``: heads are matched by their circuits, which the within-head rotations
    applied afterwards (``rotations.align_heads``) cannot change, not by raw weights.
    ``fixed``: groups left as they are (the residual stream, when a rotation aligns it).
    """
    spec = perm_spec(config)
    ref, oth = float_pair(reference, other, spec)
    perms = identity_permutation(spec)
    touching = {g: [n for n in spec.touching(g) if n in ref] for g in spec.sizes}
    groups = [g for g in spec.sizes if g not in fixed]
    rng = random.Random(seed)
    for _ in range(max_iter):
        rng.shuffle(groups)
        improved = False
        for group in groups:
            if rotations and group.startswith("heads."):
                sim, sim_kv, r = _circuit_similarity(spec, group, ref, oth, perms)
            else:
                sim, sim_kv, r = _weight_similarity(spec, group, touching[group], ref, oth, perms)
            new = solve(sim, sim_kv, r)
            # a gain this small is rounding, and chasing it could cycle
            old = _score(sim, sim_kv, perms[group], r)
            if _score(sim, sim_kv, new, r) - old > 1e-9 * abs(old) + 1e-12:
                perms[group], improved = new, True
        if not improved:
            break
    return perms


def _head_similarity(corr: torch.Tensor, heads: int, rotations: bool = False) -> np.ndarray:
    """Query head i vs j: their dims' correlations summed, dim d with dim d; with
    ``rotations``, after the best rotation of j's dims (the block's nuclear norm)."""
    d = len(corr) // 2
    cross = corr[:d, d:].reshape(heads, d // heads, heads, d // heads)
    if rotations:
        return torch.linalg.svdvals(cross.permute(0, 2, 1, 3)).sum(-1).numpy()
    return cross.diagonal(dim1=1, dim2=3).sum(-1).numpy()


def perms_from_moments(moments, spec: PermSpec, rotations: bool = False) -> dict[str, torch.Tensor]:
    perms = {}
    for group, sites in moments.items():
        if group.startswith("heads."):
            sim = _head_similarity(sites[0].correlation(), spec.sizes[group], rotations)
            perms[group] = solve(sim, None, spec.heads_per_kv)
        else:
            n = spec.sizes[group]
            # one permutation serves every residual site, so it answers to all of them at once
            sim = sum(site.correlation()[:n, n:] for site in sites)
            perms[group] = solve(sim.numpy(), None, 1)
    return perms


def activation_matching(reference, other, config: dict, batches: list[dict], rotations: bool = False) -> dict[str, torch.Tensor]:
    """Permutations of ``other`` maximizing the correlation of its activations with ``reference``'s.

    ``batches``: dicts of LongTensors ``input_ids`` and ``attention_mask`` [batch, tokens];
    masked tokens are left out of the statistics. ``rotations``: as in ``weight_matching``.
    """
    spec = perm_spec(config)
    ref, oth = float_pair(reference, other, spec)
    return perms_from_moments(joint_moments(ref, oth, config, spec, batches), spec, rotations)


def rotated_weight_matching(reference, other, config: dict, rounds: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Weight matching on folded models with the residual stream rotated, not permuted:
    alternately the other groups' permutations (given the rotation) and the rotation
    (orthogonal Procrustes on the stream's units, given the permutations)."""
    spec = perm_spec(config)
    ref, oth = float_pair(reference, other, spec)
    # the folded gains are ones, which every rotation but the identity would move: leave them out
    names = [n for n in spec.touching(RESIDUAL) if n in ref and not n.endswith("norm.weight")]
    # start from the best permutation of the stream (a rotation too), then let it turn
    start = weight_matching(ref, oth, config, rotations=True)[RESIDUAL]
    q = torch.eye(len(start), dtype=torch.float64)[start]  # row i picks old unit start[i]
    for _ in range(rounds):
        turned = rotate_residual(oth, config, q)
        perms = weight_matching(ref, turned, config, rotations=True, fixed=frozenset({RESIDUAL}))
        # the units, and the heads' dims, put in place on the unturned stream (they commute with q)
        heads = head_rotations(ref, apply_permutation(turned, config, perms), config)
        moved = rotate_heads(apply_permutation(oth, config, perms), config, heads)
        n = spec.sizes[RESIDUAL]
        sim = torch.zeros(n, n, dtype=torch.float64)
        for name in names:
            (axis,) = [x for x in spec.axes[name] if x.group == RESIDUAL]
            ua, ub = _units(ref[name], axis, n), _units(moved[name], axis, n)
            sim += ua @ ub.T / (ua.norm() * ub.norm())
        new = procrustes(sim.T)
        if (new - q).abs().max() < 1e-9:
            break
        q = new
    return perms, q


def align(reference, other, config: dict, method: str = "weight", batches: list[dict] | None = None,
          rotate: bool = True) -> dict[str, torch.Tensor]:
    """``other`` moved onto ``reference`` by symmetries: the same function, in ``reference``'s frame.

    ``rotate=False``: permutations only (Git Re-Basin as published). ``rotate=True`` (where
    the architecture allows): the residual stream rotated rather than permuted
    (``residual``), heads matched by what no rotation changes, then each head's dims
    rotated (``rotations``); the result keeps ``reference``'s norm gains.
    """
    if rotate and residual_supported(config) and gains_invertible(reference, config) and gains_invertible(other, config):
        return _align_rotated(reference, other, config, method, batches)
    rotate = rotate and rotations_supported(config)
    if method == "weight":
        perms = weight_matching(reference, other, config, rotations=rotate)
    elif method == "activation":
        if not batches:
            raise ValueError("method='activation' needs calibration batches")
        perms = activation_matching(reference, other, config, batches, rotations=rotate)
    else:
        raise ValueError(f"method must be 'weight' or 'activation', not {method!r}")
    permuted = apply_permutation(other, config, perms)
    return align_heads(reference, permuted, config) if rotate else permuted


def _align_rotated(reference, other, config: dict, method: str, batches) -> dict[str, torch.Tensor]:
    spec = perm_spec(config)
    ref, oth = (fold_norms(s, config) for s in float_pair(reference, other, spec))
    if method == "weight":
        perms, q = rotated_weight_matching(ref, oth, config)
    elif method == "activation":
        if not batches:
            raise ValueError("method='activation' needs calibration batches")
        moments = joint_moments(ref, oth, config, spec, batches)  # folding changes no activation
        q = residual_rotation(moments.pop(RESIDUAL), spec.sizes[RESIDUAL])
        perms = perms_from_moments(moments, spec, rotations=True)
    else:
        raise ValueError(f"method must be 'weight' or 'activation', not {method!r}")
    as_perm = q.argmax(1)
    if residual_is_identity(q[:, as_perm], tol=1e-4):
        # the stream's best rotation is a permutation (to the rounding of float32 statistics):
        # apply it as one, exactly, unfolded
        permuted = apply_permutation(other, config, {**perms, RESIDUAL: as_perm})
        return align_heads(reference, permuted, config)
    moved = rotate_residual(apply_permutation(oth, config, perms), config, q)
    out = unfold_norms(align_heads(ref, moved, config), config, reference)
    return {n: out[n].to(other[n].dtype) for n in other}

