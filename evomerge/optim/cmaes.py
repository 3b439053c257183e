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
        self._ahead_geno: list[np.ndarray] = []  # cma's own (unbounded) form of the genomes drawn ahead

    supports_ahead = True

    def _ask(self, first: list[np.ndarray]) -> list[np.ndarray]:
        es = self._es
        if not first:
            return es.ask()
        # forced injection: cma puts them first and bounds their step in tell. It stores them
        # as (x - mean) / sigma and returns mean + sigma * that, a rounding away from x: the
        # genomes scored are the ones drawn, registered as cma's samples of those positions
        es.inject([g.copy() for g in self._ahead_geno], force=True)
        self._ahead_geno = []
        genomes = es.ask()
        for i, g in enumerate(first):
            geno = es.sent_solutions[genomes[i]]["geno"]
            es.sent_solutions.insert(np.array(g, dtype=np.float64), geno=geno, iteration=es.countiter)
            genomes[i] = np.array(g, dtype=np.float64)
        return genomes

    def _sample_ahead(self, n: int) -> list[np.ndarray]:
        es = self._es
        self._ahead_geno = [np.array(g, dtype=np.float64) for g in es.ask_geno(n)]
        return [es.gp.pheno(g, copy=True, into_bounds=es.boundary_handler.repair) for g in self._ahead_geno]

    def _tell(self, genomes: list[np.ndarray], fitnesses: list[float]) -> None:
        # cma recognizes its own samples by their bytes and recovers their unbounded
        # originals; the base class guarantees these are exactly the asked genomes.
        self._es.tell(genomes, [-f for f in fitnesses])

    def _state(self) -> bytes:
        # bytes: a snapshot that later steps cannot change
        return pickle.dumps({"es": self._es, "ahead_geno": self._ahead_geno})

    def _load_state(self, state: bytes) -> None:
        loaded = pickle.loads(state)
        if isinstance(loaded, cma.CMAEvolutionStrategy):  # a checkpoint from before asking ahead
            loaded = {"es": loaded, "ahead_geno": []}
        self._es, self._ahead_geno = loaded["es"], loaded["ahead_geno"]
