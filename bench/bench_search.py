"""Search figures on the toy zoo (issue: the search). Needs `evomerge zoo build` first.

    python bench/bench_search.py overhead [--config search_spaces/toy_ps.yaml]
        runs the config and prints the share of worker time spent outside merging and the
        model's forward passes (target <= 15 %), and worker utilization.
    python bench/bench_search.py cma-vs-random [--evals 60] [--seeds 0 1 2]
        runs the toy PS search with CMA-ES and with random search at the same budget and
        prints the best recipe's test-split mean for each seed and the medians.
    python bench/bench_search.py subsets [--limit 64] [--seeds 0 1 2]
        runs the toy PS search with its full fitness and with each task scored on a seeded
        random subset of --limit documents, per optimizer seed: the best recipe's test mean
        for each, the medians, and the ratio of forward tokens (the fitness's tokens per
        candidate, times the candidates scored).
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


def fitness_tokens(config: Path, limit: int | None) -> tuple[int, int]:
    """(documents, tokens) one candidate's fitness scores: context + continuation per document."""
    from evomerge.fitness.evaluator import evaluators_for
    from evomerge.space.config import load_search_config

    cfg = load_search_config(str(config))
    cfg = cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"limit": limit})})
    ev = evaluators_for(cfg, test=False)["search"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    docs = tokens = 0
    for name, task in ev._task_dict["tasks"].items():
        keep = ev.samples[name] if ev.samples is not None else range(len(task.eval_docs))
        for i in keep:
            doc = task.eval_docs[i]
            text = task.doc_to_text(doc) + task.config.target_delimiter + str(task.doc_to_target(doc))
            docs, tokens = docs + 1, tokens + len(tok(text)["input_ids"])
    return docs, tokens


def subsets(args) -> None:
    import yaml

    root = Path(tempfile.mkdtemp(prefix="evomerge_subsets_"))
    base = yaml.safe_load(Path(args.config).read_text())
    variants = {"full": None, f"random {args.limit}": args.limit}
    rows = {name: [] for name in variants}
    for name, limit in variants.items():
        data = {**base, "fitness": {**base["fitness"], "limit": limit}}
        cfg = Path(args.config).parent / f".bench_subsets_{limit}.yaml"  # beside the original: same relative paths
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            docs, tokens = fitness_tokens(cfg, limit)
            for seed in args.seeds:
                run_dir = root / f"{limit}_{seed}"
                wall = run_search(cfg, run_dir, "--seed", str(seed))
                scored = sum(1 for e in history(run_dir) if not e.get("cached") and e.get("error") is None)
                rows[name].append((test_mean(run_dir), scored * tokens, wall))
                print(f"{name:12s} seed {seed}: best test mean {rows[name][-1][0]:.3f}, {scored} candidates x {docs} docs "
                      f"({tokens} tokens) = {scored * tokens:,} forward tokens, {wall:.0f} s", flush=True)
        finally:
            cfg.unlink()
    full, sub = rows["full"], rows[f"random {args.limit}"]
    med = {n: statistics.median(v[0] for v in r) for n, r in rows.items()}
    for n in rows:
        print(f"{n:12s} median best test mean over seeds {args.seeds}: {med[n]:.3f}")
    ratio = sum(v[1] for v in full) / sum(v[1] for v in sub)
    print(f"forward tokens, full / subset: {ratio:.2f}x; test mean difference (median): {med[f'random {args.limit}'] - med['full']:+.3f}"
          f"; wall full / subset: {sum(v[2] for v in full) / sum(v[2] for v in sub):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "cma-vs-random", "subsets"])
    ap.add_argument("--limit", type=int, default=64, help="subsets: documents per task")
    ap.add_argument("--config", default=str(REPO / "search_spaces" / "toy_ps.yaml"))
    ap.add_argument("--evals", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    {"overhead": overhead, "cma-vs-random": cma_vs_random, "subsets": subsets}[args.what](args)


if __name__ == "__main__":
    main()
