"""Model soups (Wortsman et al. 2022): the uniform soup and the greedy soup.

Greedy: ingredients sorted by their held-out score, best first; each is added to the soup
only if the soup's held-out score does not drop. Every soup tried is scored live (the
tensors `evomerge merge` writes for its recipe, in memory), with the fitness evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io.model_dir import ModelDir
from ..recipe import Recipe
from .swa import uniform_recipe


@dataclass(frozen=True)
class Step:
    ingredient: str
    alone: float | None  # the ingredient's own held-out score (None: not scored, a uniform soup)
    soup: float | None  # the soup's score with it added (None for the first)
    kept: bool


def greedy_soup(models: list[Path], score: Callable[[Recipe], float], dtype: str | None = None,
                on_step: Callable[[Step], None] | None = None) -> tuple[Recipe, list[Step], float]:
    """(the greedy soup's recipe, what each ingredient did, its held-out score)."""
    alone = {m: score(uniform_recipe([m], dtype)) for m in models}
    order = sorted(models, key=lambda m: -alone[m])  # stable: ties keep the order given
    soup, best, steps = [order[0]], alone[order[0]], [Step(str(order[0]), alone[order[0]], None, True)]
    if on_step:
        on_step(steps[0])
    for m in order[1:]:
        tried = score(uniform_recipe(soup + [m], dtype))
        kept = tried >= best
        if kept:
            soup, best = soup + [m], tried
        steps.append(Step(str(m), alone[m], tried, kept))
        if on_step:
            on_step(steps[-1])
    return uniform_recipe(soup, dtype), steps, best


def live_scorer(models: list[Path], evaluator, device: str = "cpu", compute: str | None = "auto") -> Callable[[Recipe], float]:
    """score(recipe) -> fitness of the recipe's merge, built in memory over models opened once."""
    from transformers import AutoTokenizer

    from ..dtypes import compute_dtype
    from ..merge.live import live_state, to_model

    sources = {str(m): ModelDir(m) for m in models}
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    model = None  # one model object, overwritten by every soup tried

    def score(recipe: Recipe) -> float:
        nonlocal model
        tensors, config = live_state(recipe, sources)
        stored = next(iter(tensors.values())).dtype
        model = to_model(tensors, config, device, compute_dtype(compute, device, stored), into=model)
        return evaluator.score_model(model, tokenizer).fitness

    return score


def soup_report(steps: list[Step], final: float, greedy: bool) -> str:
    """The table `evomerge soup` prints: each ingredient, alone and (greedy) in the soup."""
    lines = ["| ingredient | alone | soup with it | kept |", "|---|---|---|---|"]
    for s in steps:
        soup = "-" if s.soup is None else f"{s.soup:.4f}"
        alone = "-" if s.alone is None else f"{s.alone:.4f}"
        lines.append(f"| {s.ingredient} | {alone} | {soup} | {'yes' if s.kept else 'no'} |")
    lines.append(f"{'greedy' if greedy else 'uniform'} soup of {sum(s.kept for s in steps)}: held-out fitness {final:.4f}")
    return "\n".join(lines)
