"""A worker's per-candidate merge, with and without its sorted magnitudes (evomerge/workers/magnitudes.py).

    python bench/bench_candidate.py [--config search_spaces/smollm2_ps.yaml] [--candidates 6] [--threads 1]

Builds one CandidateWorker in this process for the config (its sources resident, as a Ray
worker holds them; --threads as a worker's CPUs), decodes --candidates random genomes of its
space, and materializes each in place, taking turns: once with the worker's sorted copies of
|source - base| (the first candidate sorts them) and once selecting every threshold per
candidate. Prints the median seconds per candidate of each, their ratio, what the first
candidate's sorting cost and the copies' size, and checks that both give the same tensors.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "search_spaces" / "smollm2_ps.yaml"))
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from evomerge.run.search import build_space
    from evomerge.space.config import load_search_config
    from evomerge.workers.candidate import CandidateWorker
    from evomerge.workers.magnitudes import SortedMagnitudes

    cfg = load_search_config(args.config)
    space = build_space(cfg)
    worker = CandidateWorker(cfg.model_dump(mode="json"))
    if worker.startup_error:
        raise SystemExit(worker.startup_error)
    rng = np.random.default_rng(0)
    recipes = [space.decode(rng.random(space.dim)) for _ in range(args.candidates + 1)]
    kept, none = worker.magnitudes, SortedMagnitudes(0)

    def timed(magnitudes, recipe) -> tuple[float, dict[str, torch.Tensor]]:
        worker.magnitudes = magnitudes
        t = time.perf_counter()
        state = worker.materialize(recipe).state_dict()
        return time.perf_counter() - t, state

    first, _ = timed(kept, recipes[0])
    print(f"{cfg.ps.method}, {len(worker.candidate_tensors)} tensors; first candidate with the copies "
          f"(sorting them): {first:.2f} s; copies {kept.used / 1e9:.2f} GB of a {kept.budget / 1e9:.2f} GB budget", flush=True)
    with_copies, selecting = [], []
    for recipe in recipes[1:]:
        t_sel, state = timed(none, recipe)
        state = {k: v.clone() for k, v in state.items()}
        t_kept, again = timed(kept, recipe)
        assert all(torch.equal(state[k], again[k]) for k in state), "the copies changed a candidate"
        selecting.append(t_sel)
        with_copies.append(t_kept)
        print(f"  selecting {t_sel:.2f} s, with the copies {t_kept:.2f} s", flush=True)
    a, b = statistics.median(selecting), statistics.median(with_copies)
    print(f"median per candidate: selecting {a:.2f} s, with the copies {b:.2f} s: {a / b:.2f}x; "
          f"sorting ({first - b:.2f} s once) pays for itself after {(first - b) / max(a - b, 1e-9):.1f} candidates; same tensors: yes")


if __name__ == "__main__":
    main()
