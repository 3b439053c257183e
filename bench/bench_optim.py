"""Every optimizer backend against random search on synthetic functions, same budget.

    python bench/bench_optim.py [--evals 60 200] [--seeds 5] [--dim 8]

For each function, budget and backend: the median over seeds of the best regret
(distance of the best fitness found from the optimum; lower is better), its ratio to
random search's in the same run, and the optimizer's own time per generation (ask +
tell), which the search pays on top of merging and scoring.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from evomerge.optim.registry import OPTIMIZERS, make_optimizer

OPTIMUM = 0.7  # every function peaks at x = 0.7 in every gene, with fitness 0


def sphere(x: np.ndarray) -> float:
    return -float(np.sum((x - OPTIMUM) ** 2))


def ellipsoid(x: np.ndarray) -> float:
    """Ill-conditioned (1e3) and rotated: genes interact, as layer weights do."""
    z = _rotation(len(x)) @ (x - OPTIMUM)
    return -float(np.sum(np.logspace(0, 3, len(x)) * z**2))


def rastrigin(x: np.ndarray) -> float:
    """Many local optima around one global optimum."""
    z = 4.0 * (x - OPTIMUM)
    return -float(np.sum(z**2 - np.cos(2 * np.pi * z) + 1.0))


def _rotation(dim: int, _cache: dict = {}) -> np.ndarray:
    if dim not in _cache:
        q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, dim)))
        _cache[dim] = q
    return _cache[dim]


def best_regret(name: str, fitness, dim: int, evals: int, seed: int, popsize: int) -> tuple[float, float]:
    """(best regret after ``evals`` evaluations, optimizer seconds per generation)."""
    opt = make_optimizer(name, dim, seed=seed, popsize=popsize)
    best, spent = -np.inf, 0.0
    generations = evals // popsize
    for _ in range(generations):
        start = time.perf_counter()
        genomes = opt.ask()
        spent += time.perf_counter() - start
        values = [fitness(g) for g in genomes]
        start = time.perf_counter()
        opt.tell(genomes, values)
        spent += time.perf_counter() - start
        best = max(best, *values)
    return -best, spent / generations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, nargs="+", default=[60, 200])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--popsize", type=int, default=10)
    args = parser.parse_args()

    names = sorted(OPTIMIZERS, key=lambda n: n == "random")  # baseline last
    print(f"dim={args.dim} popsize={args.popsize}, median of {args.seeds} seeds; regret: lower is better")
    print(f"{'function':<10} {'evals':>5} {'backend':<13} {'regret':>10} {'/random':>8} {'ms/gen':>8}")
    for fitness in (sphere, ellipsoid, rastrigin):
        for evals in args.evals:
            rows = {}
            for name in names:
                runs = [best_regret(name, fitness, args.dim, evals, s, args.popsize) for s in range(args.seeds)]
                rows[name] = (np.median([r for r, _ in runs]), np.median([t for _, t in runs]))
            for name, (regret, seconds) in rows.items():
                ratio = regret / rows["random"][0]
                print(f"{fitness.__name__:<10} {evals:>5} {name:<13} {regret:>10.4g} {ratio:>8.3f} {1e3 * seconds:>8.2f}")


if __name__ == "__main__":
    main()
