"""ZipIt! (Stoica et al. 2023): merge two models by zipping correlated features.

Covered: the residual stream and the attention heads of ``b`` are permutation-aligned
to ``a`` (activation matching) and then averaged, as are all norms, embeddings and
the head; each zipped layer's MLP hidden units are zipped. The 2n hidden units of
both models get one correlation matrix from the calibration tokens and the most
correlated free pair is merged, across the models or within one (the paper's rule;
``beta`` caps each model's same-model merges at ``beta`` times half the merges),
until the layer keeps its share of features. A merged unit averages its pair's input
weights (gate/up rows, GPT-2 c_fc columns); the output weights (down columns, GPT-2
c_proj rows) are summed over the pair and halved, so with no merges the MLP is
exactly the average of both MLPs.

Not covered: the paper's alpha (a merged unit never merges again, so groups are
pairs), zipping the residual stream or the heads, and its partial zipping into
separate later layers per model: here a layer left unzipped keeps all 2n units.
Layers keeping fewer units are padded with zero units, which are exactly inert,
because a Hugging Face config holds one MLP width.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .activations import joint_moments
from .permspec import PermSpec, apply_permutation, perm_spec
from .rebasin import float_pair, perms_from_moments


def zip_pairs(corr: torch.Tensor, merges: int, beta: float) -> list[list[int]]:
    """Greedy ZipIt! matching of the 2n features (a's, then b's): groups of one or two, by first member."""
    total = len(corr)
    n = total // 2
    rows, cols = torch.triu_indices(total, total, 1)
    order = corr[rows, cols].argsort(descending=True, stable=True).tolist()
    rows, cols = rows.tolist(), cols.tolist()
    budget = int(merges // 2 * beta)
    used, same, pairs = [False] * total, [0, 0], []
    # a second pass ignores the budget: the greedy can use up one model's
    # cross partners and leave only same-model pairs to reach the target
    for capped in (True, False):
        for k in order:
            if len(pairs) == merges:
                break
            x, y = rows[k], cols[k]
            if used[x] or used[y]:
                continue
            side = int(x >= n)
            if side == int(y >= n):
                if capped and same[side] >= budget:
                    continue
                same[side] += 1
            pairs.append([x, y])
            used[x] = used[y] = True
    return sorted(pairs + [[k] for k in range(total) if not used[k]])


def merge_matrices(groups: list[list[int]], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(merge [m, 2n]: averages each group's members, unmerge [2n, m]: copies a unit back to its members)."""
    merge, unmerge = torch.zeros(len(groups), total), torch.zeros(total, len(groups))
    for k, members in enumerate(groups):
        merge[k, members] = 1 / len(members)
        unmerge[members, k] = 1
    return merge, unmerge


def _along(t: torch.Tensor, dim: int, matrix: torch.Tensor, width: int) -> torch.Tensor:
    """``matrix @ t`` along ``dim``, zero-padded there to ``width``."""
    x = t.movedim(dim, 0)
    y = (matrix @ x.reshape(len(x), -1)).reshape(-1, *x.shape[1:])
    y = torch.cat([y, y.new_zeros(width - len(y), *y.shape[1:])])
    return y.movedim(0, dim)


def _zip_layer(spec: PermSpec, i: int, a, b, corr, merges: int, beta: float, width: int) -> dict[str, torch.Tensor]:
    group = f"mlp.{i}"
    merge, unmerge = merge_matrices(zip_pairs(corr, merges, beta), 2 * spec.sizes[group])
    out_weight = f"{spec.modules.layers}.{i}.{spec.modules.mlp_out}.weight"
    zipped = {}
    for name in spec.touching(group):
        if name not in a:
            continue
        (axis,) = [x for x in spec.axes[name] if x.group == group]
        both = torch.cat([a[name], b[name]], axis.dim)
        zipped[name] = _along(both, axis.dim, unmerge.T / 2 if name == out_weight else merge, width)
    return zipped


def zipit(a, b, config: dict, batches: list[dict], ratio: float = 1.0, layers: int | None = None,
          beta: float = 0.125) -> tuple[dict[str, torch.Tensor], dict]:
    """``a`` and ``b`` zipped into one model: (state dict in ``a``'s dtypes, its config).

    ``ratio``: the share of the n possible merges made in a zipped layer, which then
    keeps m = 2n - round(ratio * n) MLP units (1: m = n, 0: m = 2n, no merge).
    ``layers``: zip only the first this many layers (None: all); the rest keep 2n.
    ``beta``: the same-model merge budget, as in the paper (0: merges only across).
    ``batches``: calibration dicts of LongTensors ``input_ids``, ``attention_mask``.
    """
    spec = perm_spec(config)
    zipped_layers = spec.num_layers if layers is None else layers
    if not 0 <= ratio <= 1 or not 0 <= beta <= 1 or not 0 <= zipped_layers <= spec.num_layers:
        raise UserError(f"zipit needs 0 <= ratio <= 1, 0 <= beta <= 1 and 0 <= layers <= {spec.num_layers}; got ratio={ratio}, beta={beta}, layers={layers}")
    fa, fb = float_pair(a, b, spec)
    moments = joint_moments(fa, fb, config, spec, batches)
    # MLP units are zipped from all 2n of them, so only the other groups are permuted
    perms = {g: p for g, p in perms_from_moments(moments, spec).items() if not g.startswith("mlp.")}
    fb = apply_permutation(fb, config, perms)

    merges = [round(ratio * spec.sizes[f"mlp.{i}"]) if i < zipped_layers else 0 for i in range(spec.num_layers)]
    width = max(2 * spec.sizes[f"mlp.{i}"] - merges[i] for i in range(spec.num_layers))
    state = {name: (fa[name] + fb[name]) / 2 for name in fa}
    for i in range(spec.num_layers):
        corr = moments[f"mlp.{i}"][0].correlation()
        state.update(_zip_layer(spec, i, fa, fb, corr, merges[i], beta, width))
    width_key = "n_inner" if spec.model_type == "gpt2" else "intermediate_size"
    return {name: t.to(a[name].dtype) for name, t in state.items()}, {**config, width_key: width}
