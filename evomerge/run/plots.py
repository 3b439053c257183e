"""The report's figures, each built from what a run directory holds.

Every builder returns a matplotlib Figure (the caller saves and closes it), so a test can read
back what was drawn: the points of the fitness plot, the array of a heatmap, the path's slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..space.codec import SearchSpace
from .racing import scored_in_full


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: the report runs on headless machines and beside a live search
    import matplotlib.pyplot as plt

    return plt


def best_so_far(history: Sequence[dict]) -> list[tuple[int, dict]]:
    """(eval id, the best fully scored entry up to it), in eval-id order: the order a run's
    candidates were asked in, which is not the order they finished in with several workers."""
    out, best = [], None
    for e in sorted(history, key=lambda e: e["eval_id"]):
        if scored_in_full(e) and (best is None or e["fitness"] > best["fitness"]):
            best = e
        if best is not None:
            out.append((e["eval_id"], best))
    return out


def fitness_figure(history: Sequence[dict]):
    """Every scored candidate (colour: generation), raced-off ones hollow, failures as crosses
    on the floor, and the best so far by eval id."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    scored = [e for e in history if scored_in_full(e)]
    raced = [e for e in history if e.get("stage") == "first" and e.get("fitness") is not None]
    failed = [e for e in history if e.get("error") is not None]
    gens = [e["generation"] for e in scored]
    points = ax.scatter([e["eval_id"] for e in scored], [e["fitness"] for e in scored], c=gens, cmap="viridis",
                        s=14, alpha=0.8, label="candidate", gid="candidates")
    if gens:
        from matplotlib.ticker import MaxNLocator

        fig.colorbar(points, ax=ax, label="generation").locator = MaxNLocator(integer=True)
    if raced:
        ax.scatter([e["eval_id"] for e in raced], [e["fitness"] for e in raced], s=14, facecolors="none",
                   edgecolors="grey", label="raced off (first stage)", gid="raced")
    if failed:
        floor = min([e["fitness"] for e in scored], default=0.0)
        ax.scatter([e["eval_id"] for e in failed], [floor] * len(failed), marker="x", color="C3",
                   label="failed", gid="failed")
    line = best_so_far(history)
    if line:
        ax.step([i for i, _ in line], [b["fitness"] for _, b in line], where="post", color="C1", lw=2,
                label="best so far", gid="best")
    ax.set_xlabel("evaluation (eval id)")
    ax.set_ylabel("fitness")
    clipped = _clip_low(ax, [e["fitness"] for e in scored])
    ax.set_title(f"fitness of {len(scored)} candidates" + (f" ({clipped} far below, off the bottom)" if clipped else ""))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _clip_low(ax, values: Sequence[float]) -> int:
    """Start the y axis near the 5th percentile: a few early, broken candidates far below
    would otherwise squash the range where the search improves. Returns how many fall off."""
    vals = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(vals) < 20:
        return 0
    low, high = np.percentile(vals, 5), vals.max()
    pad = 0.05 * max(high - low, 1e-9)
    ax.set_ylim(low - pad, high + pad)
    return int((vals < low - pad).sum())


def terms_figure(history: Sequence[dict], terms: Sequence[tuple[str, str]]):
    """Each fitness term's score of the best-so-far candidate, against eval id."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    line = best_so_far(history)
    xs = [i for i, _ in line]
    every = []
    for task, metric in terms:
        ys = [(b.get("scores") or {}).get(task, {}).get(metric, np.nan) for _, b in line]
        ax.step(xs, ys, where="post", label=f"{task} {metric}", gid=f"term:{task}")
        every += ys
    _clip_low(ax, every)
    ax.set_xlabel("evaluation (eval id)")
    ax.set_ylabel("score of the best so far")
    ax.set_title("each fitness term, on the best candidate so far")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def recipe_arrays(space: SearchSpace, genome: Sequence[float]) -> dict[tuple[str, str], np.ndarray]:
    """(parameter, part) -> values, one row per source and one column per layer group, for the
    per-model parameters the space tunes (global ones such as lambda are single numbers)."""
    x = np.asarray(genome, dtype=float)
    groups = space.groups
    out: dict[tuple[str, str], np.ndarray] = {}
    for i, (name, model, part) in enumerate(space.ps_keys):
        if model is None:
            continue
        row = [space.genes[i * groups + g].value(x[i * groups + g]) for g in range(groups)]
        out.setdefault((name, part), []).append(row)
    return {k: np.array(v) for k, v in out.items()}


def global_values(space: SearchSpace, genome: Sequence[float]) -> dict[str, list[float]]:
    """Global tuned parameters (one per part and layer group), e.g. lambda."""
    x = np.asarray(genome, dtype=float)
    out: dict[str, list[float]] = {}
    for i, (name, model, part) in enumerate(space.ps_keys):
        if model is None:
            label = name if part == "all" else f"{name} ({part})"
            out[label] = [round(space.genes[i * space.groups + g].value(x[i * space.groups + g]), 4)
                          for g in range(space.groups)]
    return out


def heatmap_figure(space: SearchSpace, genome: Sequence[float], layer_counts: int, sources: Sequence[str]):
    """One heatmap per tuned parameter (and part, where the space splits attention/MLP/rest):
    sources down, layer groups across, the value in each cell."""
    plt = _plt()
    arrays = recipe_arrays(space, genome)
    params = list(dict.fromkeys(k[0] for k in arrays))
    parts = list(dict.fromkeys(k[1] for k in arrays))
    fig, axes = plt.subplots(len(params), len(parts), squeeze=False,
                             figsize=(max(5.5, 1.0 + 0.55 * space.groups) * len(parts), 1.2 + 0.55 * len(sources) * len(params) + 0.6))
    span = max(1, -(-layer_counts // space.groups))  # layers per group
    bounds = {}
    for i, (name, model, _) in enumerate(space.ps_keys):
        if model is not None:
            gene = space.genes[i * space.groups]
            bounds[name] = (gene.low, gene.high)
    for r, name in enumerate(params):
        for c, part in enumerate(parts):
            ax, data = axes[r][c], arrays[(name, part)]
            low, high = bounds[name]  # the search's bounds, so colours compare across parts
            im = ax.imshow(data, aspect="auto", cmap="magma", vmin=low, vmax=high, gid=f"heatmap:{name}:{part}")
            for (i, j), v in np.ndenumerate(data):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (low + high) / 2 else "black")
            ax.set_yticks(range(len(sources)), sources, fontsize=8)
            ax.set_xticks(range(space.groups), [_group_label(g, span, layer_counts) for g in range(space.groups)],
                          fontsize=7, rotation=45 if space.groups > 8 else 0)
            ax.set_xlabel("layer" if span == 1 else "layers")
            ax.set_title(name if part == "all" else f"{name}: {part}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    # parameters shared by all sources (lambda, say): one value per layer group, as a line of text
    shared = "; ".join(f"{k} by layer: {' '.join(f'{v:.2f}' for v in vals)}" for k, vals in global_values(space, genome).items())
    fig.suptitle("best recipe: per source and layer" + (f"\n{shared}" if shared else ""), fontsize=9)
    fig.tight_layout()
    return fig


def _group_label(g: int, span: int, layers: int) -> str:
    lo, hi = g * span, min(layers, (g + 1) * span) - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


def route_figure(slots: Sequence[dict], layer_counts: dict[str, int], sources: Sequence[str]):
    """The routed path of a DFS recipe: each source a column of its layers, the path a line
    through the layers it runs, in order, each step numbered with its input scale."""
    plt = _plt()
    col = {s: i for i, s in enumerate(sources)}
    tallest = max(layer_counts[s] for s in sources)
    fig, ax = plt.subplots(figsize=(1.8 + 1.7 * len(sources), 1.2 + 0.45 * tallest))
    for s, i in col.items():
        for layer in range(layer_counts[s]):
            ax.add_patch(plt.Rectangle((i - 0.3, layer - 0.4), 0.6, 0.8, color="0.9", ec="0.6", lw=0.5))
    xs = [col[s["source"]] for s in slots]
    ys = [s["layer"] for s in slots]
    ax.plot(xs, ys, "-", color="C0", alpha=0.5, lw=1.5, gid="path")
    ax.scatter(xs, ys, color="C0", zorder=3, s=30, gid="slots")
    for k, s in enumerate(slots):
        scale = s.get("scale", 1.0)
        ax.annotate(f"{k}" + ("" if abs(scale - 1.0) < 5e-4 else f" ×{scale:.2f}"), (xs[k], ys[k]),
                    textcoords="offset points", xytext=(8, -3), fontsize=7)
    ax.set_xticks(range(len(sources)), sources, fontsize=8)
    ax.set_yticks(range(tallest))
    ax.set_xlim(-0.6, len(sources) - 0.4)
    ax.set_ylim(-0.7, tallest - 0.3)
    ax.set_ylabel("layer (input at the bottom)")
    ax.set_title(f"routed path: {len(slots)} slots (step k, ×input scale)", fontsize=9)
    fig.tight_layout()
    return fig


def front_figure(history: Sequence[dict], front: Sequence[dict], cfg):
    """Every candidate's objectives, pair by pair, with the Pareto front marked."""
    from .front import objectives

    plt = _plt()
    terms = [(t.task, t.metric) for t in cfg.fitness.tasks]
    pairs = [(a, b) for a in range(len(terms)) for b in range(a + 1, len(terms))]
    fig, axes = plt.subplots(1, len(pairs), squeeze=False, figsize=(4.2 * len(pairs), 3.8))
    every = [v for v in (objectives(e, cfg) for e in history) if v is not None]
    on = [v for v in (objectives(e, cfg) for e in front) if v is not None]
    for ax, (a, b) in zip(axes[0], pairs):
        ax.scatter([v[a] for v in every], [v[b] for v in every], s=8, color="0.7", label="candidate")
        ax.scatter([v[a] for v in on], [v[b] for v in on], s=22, color="C3", label="Pareto front", gid="front")
        ax.set_xlabel(" ".join(terms[a]), fontsize=8)
        ax.set_ylabel(" ".join(terms[b]), fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Pareto front: {len(on)} of {len(every)} candidates", fontsize=10)
    fig.tight_layout()
    return fig
