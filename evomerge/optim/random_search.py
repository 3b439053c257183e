"""Uniform random search: the reference backend and the baseline the others must beat."""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.optim.base import Optimizer


class RandomSearch(Optimizer):
    """Every genome uniform in [0,1]^dim, independent of all fitness seen.

    ``sigma0`` and ``x0`` are accepted for a uniform constructor and unused: a
    baseline that started near a good point would not be a baseline.
    """

    def __init__(self, dim: int, popsize: int, *, seed: int, sigma0: float = 0.2, x0=None) -> None:
        super().__init__(dim, popsize)
        self._rng = np.random.default_rng(seed)

    supports_ahead = True

    def _ask(self, first: list[np.ndarray]) -> list[np.ndarray]:
        return list(first) + list(self._rng.random((self.popsize - len(first), self.dim)))

    def _sample_ahead(self, n: int) -> list[np.ndarray]:
        return list(self._rng.random((n, self.dim)))

    def _tell(self, genomes: list[np.ndarray], fitnesses: list[float]) -> None:
        pass  # nothing to learn

    def _state(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
