"""The zoo on several seeds: does every seed's family hold the bars the toy search relies on?

    python bench/zoo_seeds.py [--seeds 0 1 2 3 4] [--root runs/zoo_seeds] [--jobs 1] [--search] [--vectors]

Builds (or finds cached) `evomerge zoo build ROOT/seedN --seed N` for each seed, scores every
source, the uniform merge and the hand-merge grid (docs/hand_merges/*.yaml, pointed at that
seed's zoo) on the test splits, and prints one row per seed and the spread. The bars
(issue: a proof that reproduces): every specialist >= 0.90 on its own skill and <= 0.50 on
another; no source averages above 0.60; the best hand merge >= 0.85; the uniform merge < 0.50.
With --search it also runs the default search (search_spaces/toy_ps.yaml) on each seed's zoo
(~3 min each on 2 cores): its best recipe's test mean must be >= 0.95 and above the best hand
merge, the uniform merge and the best single source. With --vectors it prints instead each
seed's task vectors' norms and pairwise cosines (seconds; a seed whose merges break may show why).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
HAND = REPO / "docs" / "hand_merges"
ZOO_IN_RECIPES = "../../runs/zoo"  # how the shipped hand merges name the default zoo


def hand_grid(zoo: Path) -> dict[str, dict]:
    """The shipped hand merges, their model paths pointed at ``zoo``."""
    import yaml

    def repoint(node):  # in the parsed recipe, not its text: a path may hold YAML's own characters (",")
        if isinstance(node, dict):
            return {k: repoint(v) for k, v in node.items()}
        if isinstance(node, list):
            return [repoint(v) for v in node]
        return node.replace(ZOO_IN_RECIPES, str(zoo)) if isinstance(node, str) else node

    return {path.stem: repoint(yaml.safe_load(path.read_text())) for path in sorted(HAND.glob("*.yaml"))}


def score_zoo(zoo: Path) -> dict:
    """Test-split exact match per skill of each source, the uniform merge and each hand merge."""
    import logging

    from evomerge.fitness.env import set_offline_env, set_quiet_env

    set_offline_env()
    set_quiet_env()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.terms import FitnessTerm
    from evomerge.merge.to_disk import merge_to_disk
    from evomerge.recipe import parse_recipe
    from evomerge.zoo.build import read_manifest

    skills = [m for m in read_manifest(zoo)["models"] if m != "base"]
    evaluator = Evaluator([FitnessTerm(f"{s}_test", "acc") for s in skills])

    def scores(model_dir: Path) -> dict[str, float]:
        got = evaluator.score_dir(model_dir).scores
        return {s: got[f"{s}_test"]["acc"] for s in skills}

    rows = {name: scores(zoo / name) for name in ["base", *skills]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in hand_grid(zoo).items():
            merge_to_disk(parse_recipe(recipe), Path(tmp) / name, progress=False)
            rows[name] = scores(Path(tmp) / name)
    return {"skills": skills, "rows": rows}


def summary(result: dict) -> dict:
    skills, rows = result["skills"], result["rows"]
    mean = {name: statistics.fmean(r.values()) for name, r in rows.items()}
    hands = {n: m for n, m in mean.items() if n not in ["base", *skills, "uniform"]}
    best_hand = max(hands, key=hands.get)
    own = min(rows[s][s] for s in skills)
    other = max(rows[s][t] for s in skills for t in skills if t != s)
    out = {
        "own_min": own, "other_max": other,
        "source_mean_max": max(mean[n] for n in ["base", *skills]),
        "uniform": mean["uniform"], "best_hand": mean[best_hand], "best_hand_name": best_hand,
    }
    out["holds"] = (own >= 0.90 and other <= 0.50
                    and out["source_mean_max"] <= 0.60 and out["best_hand"] >= 0.85 and out["uniform"] < 0.50)
    return out


def vector_stats(zoo: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Each specialist's task vector (its weights minus the base's, all tensors): norm, and each pair's cosine."""
    import itertools

    import torch
    from safetensors.torch import load_file

    from evomerge.zoo.build import read_manifest

    base = load_file(zoo / "base" / "model.safetensors")
    taus = {}
    for name in (m for m in read_manifest(zoo)["models"] if m != "base"):
        weights = load_file(zoo / name / "model.safetensors")
        taus[name] = torch.cat([(weights[k] - base[k]).flatten() for k in sorted(base)])
    norms = {n: float(t.norm()) for n, t in taus.items()}
    cos = {f"{a}/{b}": float(taus[a] @ taus[b]) / (norms[a] * norms[b]) for a, b in itertools.combinations(taus, 2)}
    return norms, cos


def search_mean(zoo: Path) -> float:
    """The default search on ``zoo``: its best recipe's test-split mean."""
    from readme_results import search_row

    with tempfile.TemporaryDirectory() as tmp:
        scores, _ = search_row(REPO / "search_spaces" / "toy_ps.yaml", zoo.resolve(), Path(tmp) / "run")
    return statistics.fmean(scores)


def trained_s(zoo: Path) -> float:
    """The build's own training time (zoo.json), also for a zoo found cached."""
    from evomerge.zoo.build import read_manifest

    return read_manifest(zoo)["build_s"]


def search_beats(s: dict) -> bool:
    return s["search"] >= 0.95 and s["search"] > max(s["best_hand"], s["uniform"], s["source_mean_max"])


def build(seeds: list[int], root: Path, jobs: int, threads: int | None) -> None:
    """`evomerge zoo build` per seed, ``jobs`` at a time."""
    pending, running = list(seeds), {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            cmd = [sys.executable, "-m", "evomerge.cli", "zoo", "build", str(root / f"seed{seed}"), "--seed", str(seed), "--quiet"]
            cmd += ["--threads", str(threads)] if threads else []
            running[seed] = subprocess.Popen(cmd)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise SystemExit(f"zoo build --seed {seed} failed ({proc.returncode})")
                del running[seed]
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "zoo_seeds")
    ap.add_argument("--jobs", type=int, default=1, help="builds at a time (each build's training time is its own)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per build (default 2; the weights do not depend on it)")
    ap.add_argument("--search", action="store_true", help="also run the default search on each seed's zoo")
    ap.add_argument("--vectors", action="store_true", help="print each seed's task-vector norms and cosines instead of scoring")
    args = ap.parse_args()
    build(args.seeds, args.root, args.jobs, args.threads)
    if args.vectors:
        for seed in args.seeds:
            norms, cos = vector_stats(args.root / f"seed{seed}")
            print(f"seed {seed}: task vector norm " + ", ".join(f"{n} {v:.3f}" for n, v in norms.items())
                  + "; cosine " + ", ".join(f"{p} {v:.2f}" for p, v in cos.items()))
        return
    search_cols = " search | beats |" if args.search else ""
    print("| seed | specialist own (min) | specialist other (max) | best source mean | uniform | best hand merge | holds |"
          f"{search_cols} trained in |")
    print("|---|---|---|---|---|---|---|" + "---|---|" * args.search + "---|")
    sums = []
    for seed in args.seeds:
        zoo = args.root / f"seed{seed}"
        s = summary(score_zoo(zoo))
        if args.search:
            s["search"] = search_mean(zoo)
            s["beats"] = search_beats(s)
        sums.append(s)
        found = f" {s['search']:.3f} | {'yes' if s['beats'] else 'NO'} |" if args.search else ""
        print(f"| {seed} | {s['own_min']:.3f} | {s['other_max']:.3f} | {s['source_mean_max']:.3f} | {s['uniform']:.3f} | "
              f"{s['best_hand']:.3f} ({s['best_hand_name']}) | {'yes' if s['holds'] else 'NO'} |{found} {trained_s(zoo):.0f} s |",
              flush=True)
    for key in ("own_min", "other_max", "source_mean_max", "uniform", "best_hand") + (("search",) if args.search else ()):
        vals = [s[key] for s in sums]
        print(f"{key}: min {min(vals):.3f}, median {statistics.median(vals):.3f}, max {max(vals):.3f}")
    print(f"seeds holding every bar: {sum(s['holds'] for s in sums)} of {len(sums)}")
    if args.search:
        print(f"seeds where the search beats every hand merge, the uniform merge and every source, at >= 0.95: "
              f"{sum(s['beats'] for s in sums)} of {len(sums)}")


if __name__ == "__main__":
    main()
