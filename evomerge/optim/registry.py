"""The optimizer backends by the name a search config uses, and the one way to build one."""

from __future__ import annotations

import numpy as np

from evomerge.errors import UserError, nearest
from evomerge.optim.base import Optimizer
from evomerge.optim.cmaes import CMAES
from evomerge.optim.optuna_backend import OptunaCMAES, OptunaNSGA2, OptunaTPE
from evomerge.optim.random_search import RandomSearch

OPTIMIZERS: dict[str, type[Optimizer]] = {
    "cma": CMAES,
    "optuna-cmaes": OptunaCMAES,
    "optuna-tpe": OptunaTPE,
    "optuna-nsga2": OptunaNSGA2,  # multi-objective: one objective per fitness term
    "random": RandomSearch,
}


def make_optimizer(
    name: str, dim: int, *, seed: int, popsize: int, sigma0: float = 0.2, x0=None, objectives: int = 1
) -> Optimizer:
    """A fresh optimizer over [0,1]^dim; ``sigma0`` is the initial step in genome units;
    ``objectives``: how many a multi-objective backend maximizes (the fitness terms)."""
    if name not in OPTIMIZERS:
        raise UserError(
            f"unknown optimizer {name!r}{nearest(name, OPTIMIZERS)}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if dim < 1:
        raise UserError(f"the search space has {dim} genes; give it at least one tunable parameter")
    if popsize < 2:
        raise UserError(f"population {popsize} is too small; set the optimizer's popsize to 2 or more")
    if not 0.0 < sigma0 <= 1.0:
        raise UserError(f"sigma0 {sigma0} is outside (0, 1]; genomes live in [0,1], so try 0.1 to 0.3")
    if x0 is not None:
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.shape != (dim,):
            raise UserError(f"x0 has shape {x0.shape}; give one number per gene, {dim} in all")
        if not np.all((x0 >= 0.0) & (x0 <= 1.0)):
            raise UserError(f"x0 has values outside [0, 1] ({x0.min()} to {x0.max()}); genomes live in [0, 1]")
    if OPTIMIZERS[name].multi_objective:
        if objectives < 2:
            raise UserError(f"{name} is multi-objective: give the fitness two or more tasks (one objective each)")
        return OPTIMIZERS[name](dim, popsize, seed=seed, sigma0=sigma0, x0=x0, objectives=objectives)
    return OPTIMIZERS[name](dim, popsize, seed=seed, sigma0=sigma0, x0=x0)
