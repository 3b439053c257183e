"""fitness.confirm N: the run's best chosen on every document, among what a subset found.

A search on a document subset picks its best by the subset's fitness, and the maximum of
many noisy estimates is biased upward (the winner's curse): of several near-equal candidates
it favours the one whose sampled documents happened to suit it. At the end of the search the
N best distinct recipes by that fitness (the finalists; raced-off candidates never are) are
scored with the same terms on every document of the tasks, and the best of them there becomes
the run's best: what `evomerge export`, the results table and the report name. The optimizer's
trajectory and the history are unchanged, so resume stays exact; the finalists' scores live
in ``confirmed.json``, written once, atomically, after all of them are scored (a run killed
while scoring them scores them again on resume: the same numbers).
"""

from __future__ import annotations

from .racing import scored_in_full


def finalists(history: list[dict], n: int) -> list[dict]:
    """The ``n`` best fully scored entries with distinct recipes, best first (ties: earliest)."""
    out, seen = [], set()
    for e in sorted(filter(scored_in_full, history), key=lambda e: (-e["fitness"], e["eval_id"])):
        if e["recipe_hash"] not in seen:
            seen.add(e["recipe_hash"])
            out.append(e)
            if len(out) == n:
                break
    return out


def confirmed_best(history: list[dict], confirmed: list[dict]) -> dict | None:
    """The history entry of the finalist with the best whole-split fitness (ties: earliest)."""
    scored = [c for c in confirmed if c.get("fitness") is not None]
    if not scored:
        return None
    top = max(scored, key=lambda c: (c["fitness"], -c["eval_id"]))
    return next(e for e in history if e["eval_id"] == top["eval_id"])
