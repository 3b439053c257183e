"""Several objectives: each candidate's vector of fitness-term scores, and the run's Pareto front.

A candidate's objectives are its fitness terms' scores (task metric, all maximized), in the
config's order; the weighted fitness is one point of view on them, the front is all of them:
the candidates no other candidate matches or beats on every objective.
"""

from __future__ import annotations

import math

from ..errors import UserError
from ..space.config import SearchConfig


def objectives(entry: dict, cfg: SearchConfig) -> list[float] | None:
    """The entry's objective vector, or None when it has no (finite) scores."""
    scores = entry.get("scores")
    if entry.get("error") is not None or not scores or entry.get("stage") == "first":  # a raced stop: fewer documents
        return None
    try:
        vals = [float(scores[t.task][t.metric]) for t in cfg.fitness.tasks]
    except (KeyError, TypeError):
        return None
    return vals if all(math.isfinite(v) for v in vals) else None


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(entries: list[dict], cfg: SearchConfig) -> list[dict]:
    """The non-dominated scored entries, one per objective vector (the earliest), best fitness first."""
    first: dict[tuple, dict] = {}
    for e in sorted(entries, key=lambda e: e["eval_id"]):
        v = objectives(e, cfg)
        if v is not None:
            first.setdefault(tuple(v), e)
    vecs = list(first)
    front = [first[v] for v in vecs if not any(dominates(list(w), list(v)) for w in vecs)]
    return sorted(front, key=lambda e: (-e["fitness"], e["eval_id"]))


def pick(entries: list[dict], cfg: SearchConfig, eval_id: int | None = None, weights: list[float] | None = None) -> dict:
    """A front member: by eval id, or the one maximizing ``weights`` . objectives."""
    front = pareto_front(entries, cfg)
    if not front:
        raise UserError("this run has no scored candidate yet; let the search run (or resume it) first")
    if eval_id is not None:
        hit = [e for e in entries if e["eval_id"] == eval_id]
        if not hit or objectives(hit[0], cfg) is None:
            raise UserError(f"eval {eval_id} is not a scored candidate of this run; the front's are {[e['eval_id'] for e in front]}")
        return hit[0]
    n = len(cfg.fitness.tasks)
    if weights is None or len(weights) != n or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise UserError(f"--weights takes {n} non-negative numbers, one per fitness term "
                        f"({', '.join(t.task for t in cfg.fitness.tasks)}), not all zero")
    return max(front, key=lambda e: (sum(w * v for w, v in zip(weights, objectives(e, cfg))), -e["eval_id"]))


def front_table(front: list[dict], cfg: SearchConfig) -> str:
    """The front as a Markdown table: eval id, each objective, the weighted fitness."""
    cols = [f"{t.task} {t.metric}" for t in cfg.fitness.tasks]
    lines = ["| eval | " + " | ".join(cols) + " | fitness |", "|" + "---|" * (len(cols) + 2)]
    for e in front:
        lines.append(f"| {e['eval_id']} | " + " | ".join(f"{v:.4f}" for v in objectives(e, cfg)) + f" | {e['fitness']:.4f} |")
    return "\n".join(lines)


def front_json(front: list[dict], cfg: SearchConfig) -> list[dict]:
    return [{"eval_id": e["eval_id"], "objectives": objectives(e, cfg), "fitness": e["fitness"], "genome": e["genome"]}
            for e in front]
