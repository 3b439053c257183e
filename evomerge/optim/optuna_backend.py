"""Optuna samplers (CMA-ES, TPE) behind the ask/tell interface.

A study in memory proposes each genome as one trial with parameters x0..x{dim-1},
each ``suggest_float(name, 0, 1)``. The samplers own seeded RNGs, so the state to
resume from is the pickled study (trials, sampler, its RNG); a reloaded study
continues identically (tested in tests/test_optim.py).
"""

from __future__ import annotations

import pickle
import threading
import warnings
from typing import Any

import numpy as np
import optuna

from evomerge.optim.base import Optimizer


class _OptunaOptimizer(Optimizer):
    def __init__(self, dim: int, popsize: int, sampler: optuna.samplers.BaseSampler, objectives: int = 1) -> None:
        super().__init__(dim, popsize)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study and trial
        self._study = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(), sampler=sampler, directions=["maximize"] * objectives
        )
        self._trials: list[int] = []  # trial numbers of the pending generation

    def _ask(self, first: list[np.ndarray]) -> list[np.ndarray]:
        trials = [self._study.ask() for _ in range(self.popsize)]
        self._trials = [t.number for t in trials]
        return [np.array([t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(self.dim)]) for t in trials]

    def _tell(self, genomes: list[np.ndarray], fitnesses: list[float]) -> None:
        for number, fitness in zip(self._trials, fitnesses):
            self._study.tell(number, fitness)
        self._trials = []

    def _tell_objectives(self, genomes: list[np.ndarray], objectives: list[list[float]]) -> None:
        for number, values in zip(self._trials, objectives):
            self._study.tell(number, list(values))
        self._trials = []

    def _state(self) -> dict[str, Any]:
        # optuna 5.1's genetic samplers (NSGA-II) hold a threading.Lock, which pickle refuses:
        # the snapshot leaves it out and the loaded study gets a new one (it guards no state)
        sampler = self._study.sampler
        lock = sampler.__dict__.pop(_LOCK, None)
        try:
            return {"study": pickle.dumps(self._study), "trials": list(self._trials), "lock": lock is not None}
        finally:
            if lock is not None:
                setattr(sampler, _LOCK, lock)

    def _load_state(self, state: dict[str, Any]) -> None:
        self._study = pickle.loads(state["study"])
        self._trials = list(state["trials"])
        if state.get("lock"):
            setattr(self._study.sampler, _LOCK, threading.Lock())


_LOCK = "_thread_lock"


class OptunaCMAES(_OptunaOptimizer):
    """Optuna's CmaEsSampler (needs the ``cmaes`` package).

    Its first generation is sampled uniformly: optuna learns the search space from
    completed trials, and none is complete while generation 0 is asked. CMA-ES then
    starts at ``x0`` (default: the centre) with step ``sigma0``.
    """

    def __init__(self, dim: int, popsize: int, *, seed: int, sigma0: float = 0.2, x0=None) -> None:
        start = None if x0 is None else {f"x{i}": float(v) for i, v in enumerate(x0)}
        # x0/sigma0 are deprecated in optuna 4.9 (removal announced for 6.0) with no
        # replacement; until then they are the only way to honour the configured start.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sampler = optuna.samplers.CmaEsSampler(
                x0=start, sigma0=sigma0, seed=seed, popsize=popsize, warn_independent_sampling=False
            )
        super().__init__(dim, popsize, sampler)


class OptunaTPE(_OptunaOptimizer):
    """Optuna's TPESampler with its defaults (10 uniform startup trials).

    TPE has no start point or step size: ``x0`` and ``sigma0`` are unused.
    """

    def __init__(self, dim: int, popsize: int, *, seed: int, sigma0: float = 0.2, x0=None) -> None:
        super().__init__(dim, popsize, optuna.samplers.TPESampler(seed=seed))


class OptunaNSGA2(_OptunaOptimizer):
    """Optuna's NSGA-II (Deb et al. 2002): one objective per fitness term, all maximized.

    The population is the search's popsize; generation 0 is sampled uniformly, later ones
    by crossover and mutation of the non-dominated, crowding-sorted parents. ``x0`` and
    ``sigma0`` are unused. The run dir keeps the Pareto front (``front.json``).
    """

    multi_objective = True

    def __init__(self, dim: int, popsize: int, *, seed: int, sigma0: float = 0.2, x0=None, objectives: int = 2) -> None:
        sampler = optuna.samplers.NSGAIISampler(population_size=popsize, seed=seed)
        super().__init__(dim, popsize, sampler, objectives)
