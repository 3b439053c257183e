"""CMA-ES through the ``cma`` package, with a private RNG and genomes kept in [0,1].

Bounds: cma's ``bounds=[0, 1]`` with its default ``BoundTransform``, which maps the
Gaussian samples smoothly into the box (reflecting at the walls), so nothing is
clipped and cma still learns from the unbounded samples it drew.
"""

from __future__ import annotations

import pickle

import cma
import numpy as np

from evomerge.optim.base import Optimizer


class _Normal:
    """cma's ``randn(lam, n)`` option drawn from a private Generator.

    cma stores the bound method in its options (and its sampler), so pickling the
    strategy pickles this object, and with it the generator's exact state.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def randn(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAES(Optimizer):
    """Covariance matrix adaptation (Hansen); cma minimizes, so it is told -fitness."""

    def __init__(self, dim: int, popsize: int, *, seed: int, sigma0: float = 0.2, x0=None) -> None:
        super().__init__(dim, popsize)
        mean = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=np.float64)
        options = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "randn": _Normal(seed).randn,
            "seed": np.nan,  # "do nothing": randn above draws every sample, no seed to report
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # no outcmaes/ files
        }
        self._es = cma.CMAEvolutionStrategy(mean, sigma0, options)

    def _ask(self) -> list[np.ndarray]:
        return self._es.ask()

    def _tell(self, genomes: list[np.ndarray], fitnesses: list[float]) -> None:
        # cma recognizes its own samples by their bytes and recovers their unbounded
        # originals; the base class guarantees these are exactly the asked genomes.
        self._es.tell(genomes, [-f for f in fitnesses])

    def _state(self) -> bytes:
        return pickle.dumps(self._es)  # bytes: a snapshot that later steps cannot change

    def _load_state(self, state: bytes) -> None:
        self._es = pickle.loads(state)
