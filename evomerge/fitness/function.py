"""A fitness function in place of lm-eval tasks: ``fn(model, tokenizer) -> float | dict[str, float]``.

The function gets the live in-memory candidate (the model `evomerge export` would write,
in the workers' compute dtype) and its tokenizer, called under ``torch.no_grad()``; it must
leave the model's weights alone (the next candidate is written into the same object). A
dict return must hold ``"fitness"``; its other keys are kept as scores. Either way the
history records ``scores = {"function": {"fitness": v, **other keys}}`` and ``fitness = v``:
one fitness term, which is what ``fitness.tasks`` reads as in such a config (space/config.py),
so the Pareto front, `evomerge report` and `export` see one objective.

A config names the function by import path (``fitness.function: package.module:name``),
imported once per worker; ``evomerge.search(config, fitness=fn)`` sends the callable itself
to the workers (Ray pickles closures and functions of ``__main__`` by value), and the config
records its ``module:qualname`` with ``by_value: true``, so resuming asks for it again.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from numbers import Real
from typing import Any, Callable

from evomerge.errors import UserError
from evomerge.fitness.terms import FitnessTerm, Result

FUNCTION_TASK, FUNCTION_METRIC = "function", "fitness"  # the history's scores key for a function's value


def function_name(fn: Callable) -> str:
    """``module:qualname``: what the frozen config records for a callable."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def load_function(path: str) -> Callable:
    """Import ``package.module:name`` (``name`` may be dotted: ``Class.method``): installed, on
    PYTHONPATH, or in the working directory. Ray puts the driver's working directory on its
    workers' path; the ``evomerge`` command's own path lacks it, so it is added here, last,
    and the driver's check imports what the workers will."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"fitness.function {path!r} must be an import path: package.module:name")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a missing module or one that fails on import: the user's to fix
        raise UserError(f"fitness.function {path!r}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"fitness.function {path!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"fitness.function {path!r} is a {type(obj).__name__}, not a function")
    return obj


def function_for(fitness, given: Callable | None) -> Callable:
    """The callable a function config scores with: the one given (a run started with
    ``fitness=fn``), else the one its import path names."""
    if fitness.by_value and given is None:
        raise UserError(f"this run was scored by a callable given to evomerge.search ({fitness.function}); "
                        "pass it again: evomerge.resume(RUN_DIR, fitness=fn)")
    if given is None:
        return load_function(fitness.function)
    if not callable(given):
        raise UserError(f"fitness must be a callable fn(model, tokenizer), not {type(given).__name__}")
    if fitness.function != function_name(given):
        raise UserError(f"this run was scored by {fitness.function}, not {function_name(given)}; "
                        "pass the function it was started with")
    return given


def _number(value: Any, name: str, key: str | None = None) -> float:
    """A finite float from a Python, NumPy or one-element torch number; else the candidate's error."""
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        value = value.item()  # a torch scalar such as -loss
    what = f"fitness function {name} returned " + ("" if key is None else f"{key!r}: ")
    # bool is a Real in Python; True as a fitness is a bug in the function, not a score
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{what}{value!r} ({type(value).__name__}); it must return a number or a dict of numbers")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{what}{value}; it must be finite")
    return value


def scores_of(value: Any, name: str) -> dict[str, float]:
    """The function's return as ``{"fitness": v, **other keys}``, every value a finite float."""
    if not isinstance(value, dict):
        return {FUNCTION_METRIC: _number(value, name)}
    if FUNCTION_METRIC not in value:
        raise UserError(f"fitness function {name} returned a dict without 'fitness' (keys {sorted(map(str, value))})")
    return {str(k): _number(v, name, k) for k, v in value.items()}


class FunctionEvaluator:
    """The search split's evaluator for a function: ``score_model`` as an lm-eval Evaluator's."""

    terms = [FitnessTerm(FUNCTION_TASK, FUNCTION_METRIC)]
    samples = None  # no documents: nothing for subsets.json
    documents = None

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def score_model(self, model, tokenizer) -> Result:
        scores = scores_of(self.fn(model, tokenizer), self.name)
        return Result(scores={FUNCTION_TASK: scores}, fitness=scores[FUNCTION_METRIC])


def check_resume(fitness, given: Callable | None) -> None:
    """Before a run resumes: the fitness it was started with is the one it gets."""
    if fitness.function is None:
        if given is not None:
            raise UserError("this run scores lm-eval tasks (fitness.tasks); resume it without fitness=")
        return
    function_for(fitness, given)  # a callable run needs its callable; a path must still import
