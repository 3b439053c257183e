"""Fitness terms, their weighted combination, and the result's JSON and table forms.

Pure Python: no lm-eval import, so configs and the CLI can parse terms cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from numbers import Real

from evomerge.errors import UserError

Scores = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass(frozen=True)
class FitnessTerm:
    """``weight * scores[task][metric]`` in the fitness (a weighted mean over the terms)."""

    task: str
    metric: str = "acc"
    weight: float = 1.0

    def __post_init__(self) -> None:
        for field, value in (("task", self.task), ("metric", self.metric)):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"fitness term {field} must be a non-empty name, got {value!r}")
        weight = self.weight
        # bool is a Real in Python; a weight of True is a typo, not a number.
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight):
            raise UserError(
                f"weight of fitness term {self.task}/{self.metric} must be a finite number, got {weight!r}"
            )
        if weight <= 0:
            raise UserError(f"weight of fitness term {self.task}/{self.metric} must be > 0, got {weight!r}")
        object.__setattr__(self, "weight", float(weight))


def parse_terms(spec: str, metric: str = "acc") -> list[FitnessTerm]:
    """``"mir_test,sft_test:logprob,srt_test:acc:2"`` -> terms; each item is ``task[:metric[:weight]]``."""
    terms = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        task, *rest = item.split(":")
        if len(rest) > 2:
            raise UserError(f"fitness term {item!r} has too many ':'; write task[:metric[:weight]]")
        term_metric = rest[0] if rest and rest[0] else metric
        weight: object = 1.0
        if len(rest) == 2:
            try:
                weight = float(rest[1])
            except ValueError:
                raise UserError(f"weight {rest[1]!r} in fitness term {item!r} is not a number") from None
        terms.append(FitnessTerm(task.strip(), term_metric.strip(), weight))
    if not terms:
        raise UserError(f"no tasks in {spec!r}; pass a comma-separated list such as mir_test,sft_test")
    return terms


def combine(terms: list[FitnessTerm], scores: Scores) -> float:
    """Weighted mean of the terms' scores."""
    total = 0.0
    for t in terms:
        try:
            total += t.weight * scores[t.task][t.metric]
        except KeyError:
            have = sorted(scores.get(t.task, {}))
            raise UserError(f"no score {t.task}/{t.metric} in the results; this task has {have}") from None
    return total / sum(t.weight for t in terms)


def scores_from_results(results: dict[str, dict]) -> Scores:
    """lm-eval's ``results`` section -> task -> metric -> value.

    lm-eval keys metrics as ``"metric,filter"``; the usual filter ``none`` is dropped, other
    filters stay in the name. Standard errors and non-numeric entries (alias) are left out.
    """
    scores: Scores = {}
    for task, row in results.items():
        metrics = {}
        for key, value in row.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or isinstance(value, bool):
                continue
            if isinstance(value, Real):
                metrics[name if filt == "none" else key] = float(value)
        scores[task] = metrics
    return scores


@dataclass(frozen=True)
class Result:
    scores: Scores
    fitness: float

    def to_dict(self) -> dict:
        return {"scores": self.scores, "fitness": self.fitness}

    def to_json(self) -> str:
        """The ``--json`` output of ``evomerge eval``: one JSON object."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Result:
        data = json.loads(text)
        return cls(scores=data["scores"], fitness=float(data["fitness"]))

    def table(self) -> str:
        """A plain-text table: one row per task and metric, then the fitness."""
        rows = [(task, metric, f"{value:.4f}") for task in sorted(self.scores) for metric, value in sorted(self.scores[task].items())]
        rows.append(("fitness", "", f"{self.fitness:.4f}"))
        widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(("task", "metric", "value"), widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)
