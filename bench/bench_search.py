"""Search figures on the toy zoo (issue: the search). Needs `evomerge zoo build` first.

    python bench/bench_search.py overhead [--config search_spaces/toy_ps.yaml]
        runs the config and prints the share of worker time spent outside merging and the
        model's forward passes (target <= 15 %), and worker utilization.
    python bench/bench_search.py cma-vs-random [--evals 60] [--seeds 0 1 2]
        runs the toy PS search with CMA-ES and with random search at the same budget and
        prints the best recipe's test-split mean for each seed and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_search(config: Path, run_dir: Path, *extra: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir", str(run_dir), "--quiet", *extra], check=True)
    return time.perf_counter() - t


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def overhead(args) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="evomerge_overhead_")) / "run"
    run_search(Path(args.config), run_dir)
    h = [e for e in history(run_dir) if not e.get("cached")]
    res = json.loads((run_dir / "results.json").read_text())
    busy = sum(e["wall_s"] for e in h)
    merge = sum(e["merge_s"] for e in h)
    forward = sum(e["forward_s"] for e in h)
    useful = (merge + forward) / busy
    print(f"{len(h)} candidates scored; worker time {busy:.1f} s: merge {merge:.1f} s, forward passes {forward:.1f} s")
    print(f"inside the workers, time outside merge+forward: {1 - useful:.1%}")
    print(f"worker utilization (busy / workers x wall): {res['utilization']:.1%}")
    print(f"search wall time spent outside merge+forward: {1 - useful * res['utilization']:.1%} (target <= 15 %)")


def test_mean(run_dir: Path) -> float:
    row = json.loads((run_dir / "results.json").read_text())["rows"]["best found"]
    vals = [m["acc"] for m in row["scores"].values()]
    return sum(vals) / len(vals)


def cma_vs_random(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="evomerge_cma_vs_random_"))
    cfg_text = Path(args.config).read_text()
    means: dict[str, list[float]] = {"cma": [], "random": []}
    for backend in means:
        cfg = Path(args.config).parent / f".bench_{backend}.yaml"
        cfg.write_text(cfg_text.replace("backend: cma", f"backend: {backend}"))
        try:
            for seed in args.seeds:
                run_dir = root / f"{backend}_{seed}"
                wall = run_search(cfg, run_dir, "--max-evals", str(args.evals), "--seed", str(seed))
                means[backend].append(test_mean(run_dir))
                print(f"{backend:6s} seed {seed}: best recipe test mean {means[backend][-1]:.3f} ({wall:.0f} s)")
        finally:
            cfg.unlink()
    for backend, vals in means.items():
        print(f"{backend:6s} median over seeds {args.seeds}: {statistics.median(vals):.3f}")
    print(f"cma - random (median): {statistics.median(means['cma']) - statistics.median(means['random']):+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "cma-vs-random"])
    ap.add_argument("--config", default=str(REPO / "search_spaces" / "toy_ps.yaml"))
    ap.add_argument("--evals", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    overhead(args) if args.what == "overhead" else cma_vs_random(args)


if __name__ == "__main__":
    main()
