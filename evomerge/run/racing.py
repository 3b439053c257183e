"""When a raced candidate stops: the bar each generation's candidates must be able to clear.

Before generation g, from the history of generations < g only (so a resumed run races
exactly as an uninterrupted one): the bar is the ``keep``-th best fitness among fully
scored candidates, and the margin is z(confidence) times the standard deviation of
(full fitness - first-stage fitness) over the candidates scored in both stages, the first
stage's own measured error. A candidate whose first-stage fitness + margin stays below
the bar stops there. During the first ``warmup`` generations (and until there are at
least ``keep`` full scores and three pairs) nobody stops, but both stages are scored, to
measure that error.

The optimizer is told a stopped candidate's first-stage fitness: an unbiased estimate of
its full fitness on fewer documents, so CMA-ES ranks it where it most likely belongs
(below the bar, hence outside the top ``keep`` of the run so far); survivors are told
their full fitness. Stopped candidates never become the best, never enter the cache of
scored recipes, and never enter the Pareto front.
"""

from __future__ import annotations

import statistics

from ..space.config import RacingConfig

MIN_PAIRS = 3


def is_full(entry: dict) -> bool:
    return entry.get("stage") != "first"


def scored_in_full(entry: dict) -> bool:
    """Scored, without error, on every document: what may be the best, the cache or a plot's best."""
    return entry.get("fitness") is not None and entry.get("error") is None and is_full(entry)


def race_for(history: list[dict], generation: int, racing: RacingConfig) -> dict:
    """The ``race`` a worker gets for every candidate of ``generation``: {"threshold", "margin"}."""
    done = [e for e in history if e["generation"] < generation and e.get("fitness") is not None and e.get("error") is None]
    full = sorted((e["fitness"] for e in done if is_full(e)), reverse=True)
    pairs = [e["fitness"] - e["first_fitness"] for e in done if is_full(e) and e.get("first_fitness") is not None]
    if generation < racing.warmup or len(full) < racing.keep or len(pairs) < MIN_PAIRS:
        return {"threshold": float("-inf"), "margin": 0.0}
    z = statistics.NormalDist().inv_cdf(racing.confidence)
    return {"threshold": full[racing.keep - 1], "margin": z * statistics.stdev(pairs)}
