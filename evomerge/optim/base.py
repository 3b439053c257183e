"""The ask/tell interface every optimizer backend implements.

An optimizer proposes one generation of genomes x in [0,1]^dim with ``ask()`` and
learns from their fitness (higher is better) with ``tell()``. ``state_dict()`` holds
everything needed to continue identically, private RNG state included, so a resumed
search follows the trajectory of an uninterrupted one.

The bookkeeping every backend needs (the pending generation, the check that ``tell``
gets what ``ask`` gave, non-finite fitness, the generation counter, the common part of
the checkpoint) lives here once; a backend fills in four small hooks.

Asking ahead (``ask_ahead``, backends with ``supports_ahead``): between ``ask()`` and
``tell()``, the first genomes of the *next* generation are drawn from the current
distribution, so idle workers can score them while this generation's last candidates run;
the next ``ask()`` returns them first. CMA-ES takes them as injected solutions (Hansen 2011,
"Injecting external solutions into CMA-ES"): its update bounds their Mahalanobis step under
the new distribution, so samples of the previous one cannot derail it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Optimizer(ABC):
    """Maximizes a fitness over [0,1]^dim, one generation of ``popsize`` genomes at a time."""

    dim: int
    popsize: int
    # a multi-objective backend learns from each candidate's objective vector (one value per
    # fitness term, all maximized) instead of the weighted fitness
    multi_objective: bool = False
    supports_ahead: bool = False

    def __init__(self, dim: int, popsize: int) -> None:
        self.dim = dim
        self.popsize = popsize
        self._generation = 0
        self._pending: list[np.ndarray] | None = None  # asked, not yet told
        # drawn ahead: the first genomes of the generation after the pending one (of the next
        # one to ask, once the pending one is told)
        self._ahead: list[np.ndarray] | None = None
        self._worst: float | None = None  # worst finite fitness told so far
        self._worst_objectives: list[float] | None = None  # per objective, likewise

    @property
    def generation(self) -> int:
        """Number of completed (told) generations."""
        return self._generation

    def ask(self) -> list[np.ndarray]:
        """The next generation: ``popsize`` float64 genomes of shape (dim,) in [0,1].

        Asking again before ``tell`` returns the same generation: a checkpoint taken
        between ask and tell resumes with the candidates that were in flight.
        """
        if self._pending is None:
            first = self._ahead or []
            self._pending = [np.array(g, dtype=np.float64) for g in self._ask(first)]
            if len(self._pending) != self.popsize or not all(np.array_equal(g, p) for g, p in zip(first, self._pending)):
                raise RuntimeError(f"{type(self).__name__} did not start the generation with the genomes drawn ahead")
            self._ahead = None
        return [g.copy() for g in self._pending]

    def ask_ahead(self, n: int) -> list[np.ndarray]:
        """Between ``ask()`` and ``tell()``: the next generation's first ``n`` genomes, drawn
        now from the current distribution (the next ``ask()`` returns them first). Asking
        again before ``tell`` returns the same ones."""
        if n <= 0:
            return []
        if not self.supports_ahead:
            raise ValueError(f"{type(self).__name__} cannot draw a generation ahead")
        if self._pending is None:
            raise ValueError("ask_ahead() draws from the pending generation's distribution: call it after ask(), before tell()")
        if n >= self.popsize:
            raise ValueError(f"ask_ahead({n}) must leave the next generation at least one genome of its own (popsize {self.popsize})")
        if self._ahead is None:
            self._ahead = [np.array(g, dtype=np.float64) for g in self._sample_ahead(n)]
        if len(self._ahead) != n:
            raise ValueError(f"{len(self._ahead)} genomes were drawn ahead for this generation, not {n}")
        return [g.copy() for g in self._ahead]

    def tell(self, genomes: list[np.ndarray], fitnesses: list[float], objectives: list[list[float]] | None = None) -> None:
        """Report the fitness of the whole last generation, in the order it was asked
        (and, for a multi-objective backend, each candidate's objective vector).

        A NaN or infinite fitness counts as the worst finite fitness seen so far (0.0
        before any), so one broken candidate cannot derail the search; likewise per objective.
        """
        if self._pending is None:
            raise ValueError("tell() without a pending ask(); call ask() first")
        if len(genomes) != len(self._pending) or not all(
            np.array_equal(np.asarray(g, dtype=np.float64), p) for g, p in zip(genomes, self._pending)
        ):
            raise ValueError("tell() takes exactly the genomes of the last ask(), all of them, in the order asked")
        if len(fitnesses) != len(genomes):
            raise ValueError(f"tell() got {len(fitnesses)} fitnesses for {len(genomes)} genomes")
        if self.multi_objective:
            if objectives is None or len(objectives) != len(genomes):
                raise ValueError("a multi-objective backend needs one objective vector per genome")
            self._tell_objectives(self._pending, self._finite_objectives(objectives))
        else:
            self._tell(self._pending, self._finite(fitnesses))
        self._pending = None
        self._generation += 1

    def state_dict(self) -> dict[str, Any]:
        """A picklable snapshot; later ask/tell calls do not change it."""
        return {
            "backend": type(self).__name__,
            "dim": self.dim,
            "popsize": self.popsize,
            "generation": self._generation,
            "pending": None if self._pending is None else [g.copy() for g in self._pending],
            "ahead": None if self._ahead is None else [g.copy() for g in self._ahead],
            "worst": self._worst,
            "worst_objectives": self._worst_objectives,
            "backend_state": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; this instance must have the same backend, dim and popsize."""
        mine = (type(self).__name__, self.dim, self.popsize)
        theirs = (state["backend"], state["dim"], state["popsize"])
        if mine != theirs:
            raise ValueError(f"state of (backend, dim, popsize) = {theirs} cannot load into {mine}")
        self._generation = state["generation"]
        self._pending = None if state["pending"] is None else [g.copy() for g in state["pending"]]
        self._ahead = None if state.get("ahead") is None else [g.copy() for g in state["ahead"]]
        self._worst = state["worst"]
        self._worst_objectives = state.get("worst_objectives")
        self._load_state(state["backend_state"])

    def _finite(self, fitnesses: list[float]) -> list[float]:
        values = np.asarray(fitnesses, dtype=np.float64)
        finite = np.isfinite(values)
        if finite.any():
            lowest = float(values[finite].min())
            self._worst = lowest if self._worst is None else min(self._worst, lowest)
        fill = 0.0 if self._worst is None else self._worst
        return np.where(finite, values, fill).tolist()

    def _finite_objectives(self, objectives: list[list[float]]) -> list[list[float]]:
        values = np.asarray(objectives, dtype=np.float64)
        finite = np.isfinite(values)
        lowest = np.where(finite, values, np.inf).min(0)
        seen = np.isfinite(lowest)
        worst = np.full(values.shape[1], np.nan) if self._worst_objectives is None else np.asarray(self._worst_objectives)
        worst = np.where(seen, np.fmin(worst, lowest), worst)
        self._worst_objectives = worst.tolist()
        return np.where(finite, values, np.nan_to_num(worst, nan=0.0)[None, :]).tolist()

    def _tell_objectives(self, genomes: list[np.ndarray], objectives: list[list[float]]) -> None:
        raise NotImplementedError(f"{type(self).__name__} is single-objective")

    # --- backend hooks -------------------------------------------------------

    @abstractmethod
    def _ask(self, first: list[np.ndarray]) -> list[np.ndarray]:
        """Sample ``popsize`` new genomes in [0,1]^dim, starting with ``first`` (drawn ahead,
        empty unless the backend ``supports_ahead``)."""

    def _sample_ahead(self, n: int) -> list[np.ndarray]:
        """``n`` genomes from the current distribution, for the next generation."""
        raise NotImplementedError

    @abstractmethod
    def _tell(self, genomes: list[np.ndarray], fitnesses: list[float]) -> None:
        """Learn from the genomes of the last ``_ask`` and their finite fitnesses."""

    @abstractmethod
    def _state(self) -> Any:
        """Backend state as a picklable snapshot, RNG state included."""

    @abstractmethod
    def _load_state(self, state: Any) -> None:
        """Restore what ``_state`` returned."""
