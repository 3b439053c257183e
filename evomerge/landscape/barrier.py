"""Mode connectivity, seen: loss and task score along the path between two models.

Each point of the path is a recipe (linear: weights 1 - t and t; slerp: t), built in
memory with the merge kernels `evomerge merge` uses, so any point can be written out
by the recipe it prints. The barrier height is the largest rise of the loss above the
straight line between the endpoints' losses (Frankle et al. 2020; Ainsworth et al. 2023
report it at the midpoint too). With ``align``, the same pair is measured again after
permuting B onto A (Git Re-Basin), each alignment a path of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..io.model_dir import ModelDir
from ..merge.live import MemorySource, live_state, to_model
from ..recipe import Recipe, parse_recipe

METHODS = ("linear", "slerp")
# weight / activation: permutations, then the heads' rotations (evomerge/align/rotations.py);
# with -perm: permutations only (Git Re-Basin as published)
ALIGNMENTS = ("weight", "activation", "weight-perm", "activation-perm")
ALIGNED = "{b} (aligned)"  # the source name of B permuted onto A


@dataclass(frozen=True)
class Point:
    t: float
    loss: float  # mean next-token NLL over the calibration tokens
    score: float | None  # the tasks' fitness, when tasks are given


@dataclass(frozen=True)
class Curve:
    label: str  # "as given", "weight matching", ...
    points: list[Point]

    @property
    def barrier(self) -> float:
        return barrier_height([p.t for p in self.points], [p.loss for p in self.points])

    @property
    def midpoint_barrier(self) -> float:
        ts = [p.t for p in self.points]
        i = min(range(len(ts)), key=lambda k: abs(ts[k] - 0.5))
        a, b = self.points[0].loss, self.points[-1].loss
        return self.points[i].loss - ((1 - ts[i]) * a + ts[i] * b)

    def to_dict(self) -> dict:
        return {"label": self.label, "barrier": self.barrier, "midpoint_barrier": self.midpoint_barrier,
                "points": [asdict(p) for p in self.points]}


def barrier_height(ts: list[float], losses: list[float]) -> float:
    """max over t of loss(t) - ((1 - t) loss(0) + t loss(1)); 0 when the path never rises above."""
    a, b = losses[0], losses[-1]
    return max(0.0, *(loss - ((1 - t) * a + t * b) for t, loss in zip(ts, losses)))


def point_recipe(a: str, b: str, t: float, method: str) -> Recipe:
    if method == "linear":
        return parse_recipe({"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 1.0 - t}}, {"model": b, "parameters": {"weight": t}}]})
    return parse_recipe({"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                         "parameters": {"t": t}})


@torch.no_grad()
def mean_nll(model, batches: list[dict]) -> float:
    """Mean next-token negative log-likelihood over every unmasked (token, next token) pair."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["input_ids"][:, 1:]
        mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[mask].double().sum())
        count += int(mask.sum())
    return total / count


def scan(a_dir: str, b_dir: str, calibration, method: str = "linear", align: tuple[str, ...] = (),
         evaluator=None, points: int = 11, on_point: Callable[[str, Point], None] | None = None) -> list[Curve]:
    """The path as given and, per alignment, after permuting B onto A."""
    from transformers import AutoTokenizer

    from ..stats.calibration import batches as make_batches, load_texts

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    bad = [m for m in align if m not in ALIGNMENTS]
    if bad:
        raise UserError(f"--align must be one of {', '.join(ALIGNMENTS)}, got {bad[0]!r}")
    if points < 3:
        raise UserError(f"--points must be at least 3 (the endpoints and one between), got {points}")
    a, b = ModelDir(a_dir), ModelDir(b_dir)
    tokenizer = AutoTokenizer.from_pretrained(a.path)
    batches = make_batches(tokenizer, load_texts(calibration), calibration)
    ts = [i / (points - 1) for i in range(points)]
    variants: list[tuple[str, str, dict]] = [("as given", str(b_dir), {str(b_dir): b})]
    if align:
        from ..align.rebasin import align as permute_onto

        ref_state, other_state = a.load_all(), b.load_all()
        for how in align:
            name = ALIGNED.format(b=b_dir)
            matching, _, perm_only = how.partition("-")
            aligned = permute_onto(ref_state, other_state, a.config, matching, batches if matching == "activation" else None,
                                   rotate=not perm_only)
            label = f"{matching} matching" + (", permutations only" if perm_only else " + rotations")
            variants.append((label, name, {name: MemorySource(b.path, b.config, aligned)}))
    paths, model = [], None
    for label, b_ref, extra in variants:
        sources = {str(a_dir): a, **extra}
        got = []
        for t in ts:
            tensors, config = live_state(point_recipe(str(a_dir), b_ref, t, method), sources)
            model = to_model(tensors, config, into=model)
            score = evaluator.score_model(model, tokenizer).fitness if evaluator is not None else None
            got.append(Point(t, mean_nll(model, batches), score))
            if on_point:
                on_point(label, got[-1])
        paths.append(Curve(label, got))
    return paths


def table(paths: list[Curve]) -> str:
    has_score = paths[0].points[0].score is not None
    head = "| t | " + " | ".join(f"{p.label} loss" + (f" | {p.label} score" if has_score else "") for p in paths) + " |"
    lines = [head, "|" + "---|" * (1 + len(paths) * (2 if has_score else 1))]
    for i, pt in enumerate(paths[0].points):
        cells = []
        for p in paths:
            cells.append(f"{p.points[i].loss:.4f}")
            if has_score:
                cells.append(f"{p.points[i].score:.4f}")
        lines.append(f"| {pt.t:.2f} | " + " | ".join(cells) + " |")
    for p in paths:
        lines.append(f"{p.label}: barrier {p.barrier:.4f} (at the midpoint {p.midpoint_barrier:.4f})")
    if len(paths) > 1 and paths[0].midpoint_barrier > 0:
        for p in paths[1:]:
            lines.append(f"{p.label} leaves {p.midpoint_barrier / paths[0].midpoint_barrier:.1%} of the midpoint barrier")
    return "\n".join(lines)


def plot(paths: list[Curve], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_score = paths[0].points[0].score is not None
    fig, axes = plt.subplots(1, 2 if has_score else 1, figsize=(11 if has_score else 6, 4.2), squeeze=False)
    for p in paths:
        ts = [q.t for q in p.points]
        axes[0][0].plot(ts, [q.loss for q in p.points], marker="o", label=f"{p.label} (barrier {p.barrier:.3f})")
        if has_score:
            axes[0][1].plot(ts, [q.score for q in p.points], marker="o", label=p.label)
    axes[0][0].set(xlabel="t (0 = A, 1 = B)", ylabel="loss (mean NLL per token)", title="loss along the path")
    if has_score:
        axes[0][1].set(xlabel="t (0 = A, 1 = B)", ylabel="task score", title="task score along the path")
        axes[0][1].legend()
    axes[0][0].legend()
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
