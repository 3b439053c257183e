"""Racing: a candidate scored in two stages, the first of which may be its last.

Stage one scores ``first`` documents of each task's subset, drawn at random (seeded): its
fitness is an unbiased estimate of the full one. A candidate that goes on is scored on the rest, and the two
stages' means are combined by their document counts: the full subset's mean, for metrics
averaged over documents (the only ones racing accepts). When to stop is the driver's call
(evomerge/run/racing.py).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

from evomerge.errors import UserError
from evomerge.fitness.terms import Scores

if TYPE_CHECKING:
    from evomerge.fitness.evaluator import Evaluator


def racing_samples(search: "Evaluator", first: int, seed: int = 0) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The search's documents split, per task, into a seeded random ``first`` of them and the rest
    (random, not the subset's head: its indices are sorted, and the head would be the
    dataset's first documents)."""
    tasks = search._task_dict["tasks"]
    unknown = [t.task for t in search.terms if t.task not in tasks]
    if unknown:
        raise UserError(f"racing scores tasks, not groups: name the tasks of {unknown[0]!r} one by one")
    samples = search.samples or {n: list(range(len(t.eval_docs))) for n, t in tasks.items()}
    for name, task in tasks.items():
        if first >= len(samples[name]):
            raise UserError(f"racing.first ({first}) must be below the {len(samples[name])} documents task {name!r} "
                            "scores; lower it or raise fitness.limit")
        aggregate = task.aggregation()
        for term in search.terms:
            metric = term.metric.split(",")[0]
            if term.task == name and getattr(aggregate.get(metric), "__name__", "") != "mean":
                raise UserError(f"racing combines its two stages by document counts, which needs a metric averaged over "
                                f"documents; {name}'s {term.metric!r} is not (use a mean metric such as acc or logprob)")
    heads, rests = {}, {}
    for name, docs in samples.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])  # its own, beside the subset's
        pick = set(int(i) for i in rng.choice(docs, first, replace=False))
        heads[name] = [d for d in docs if d in pick]
        rests[name] = [d for d in docs if d not in pick]
    return heads, rests


def combine_stages(first: Scores, rest: Scores, n_first: dict[str, int], n_rest: dict[str, int]) -> Scores:
    """Per task and metric, the mean over both stages' documents."""
    out: Scores = {}
    for task, metrics in first.items():
        a, b = n_first[task], n_rest[task]
        out[task] = {m: (a * v + b * rest[task][m]) / (a + b) for m, v in metrics.items()}
    return out
