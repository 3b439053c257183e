"""Search figures on the toy zoo (issue: the search). Needs `evomerge zoo build` first. Every
subcommand takes --config (default search_spaces/toy_ps.yaml) and --zoo DIR (another seed's
zoo, `evomerge zoo build DIR --seed N`, read in place of runs/zoo).

    python bench/bench_search.py overhead [--config search_spaces/toy_ps.yaml]
        runs the config and prints the share of worker time spent outside merging and the
        model's forward passes (target <= 10 %), and worker utilization.
    python bench/bench_search.py cma-vs-random [--evals 60] [--seeds 0 1 2] [--popsize P] [--backends cma random]
        runs the toy PS search with CMA-ES and with random search at the same budget and
        prints, for each seed and the medians, the best recipe's test-split mean (exact match),
        its test-split mean log-probability per answer character (the objective's held-out
        counterpart) and the best fitness found (the search split's objective, which the
        optimizers maximize). The exact match saturates near the specialists' own accuracy;
        the log-probabilities do not. --popsize sets both backends' population (default: the
        config's; toy_ps: 16).
    python bench/bench_search.py subsets [--limit 64] [--racing 16] [--confirm 8] [--seeds 0 1 2]
        runs the toy PS search with its full fitness and with each task scored on a seeded
        random subset of --limit documents (and, with --racing N, that subset raced: N
        documents per task first), per optimizer seed: the best recipe's test mean for each,
        the medians, and the ratio of forward tokens (each candidate's documents' tokens,
        summed over the candidates scored; with --confirm N, the N finalists' whole splits too).
    python bench/bench_search.py utilization [--workers 8] [--delay 1.0] [--cv 0.3] [--popsize 16] [--evals 128] [--lookahead N]
        runs the toy PS search on --workers Ray workers whose every evaluation also waits a
        lognormal delay (mean --delay s, coefficient of variation --cv; drawn per recipe),
        once generation by generation (lookahead 0) and once asking ahead (lookahead auto),
        and prints each run's worker utilization and wall time.
    python bench/bench_search.py pareto [--evals 320]
        runs the toy PS search once single-objective (its optimizer, weighted fitness) and once
        with optuna's NSGA-II on the same three tasks and budget; prints, per task, the best of
        the NSGA-II front against the single-objective best on that task, then exports every
        front member (`evomerge export RUN --pick N`) and scores the exported model: the
        largest difference from what the history says.
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
    root = Path(tempfile.mkdtemp(prefix="evomerge_overhead_"))
    run_dir = root / "run"
    run_search(variant(Path(args.config), root / "config.yaml", args.zoo), run_dir)
    h = [e for e in history(run_dir) if not e.get("cached")]
    res = json.loads((run_dir / "results.json").read_text())
    busy = sum(e["wall_s"] for e in h)
    merge = sum(e["merge_s"] for e in h)
    forward = sum(e["forward_s"] for e in h)
    useful = (merge + forward) / busy
    print(f"{len(h)} candidates scored; worker time {busy:.1f} s: merge {merge:.1f} s, forward passes {forward:.1f} s")
    print(f"inside the workers, time outside merge+forward: {1 - useful:.1%}")
    print(f"worker utilization (busy / workers x wall): {res['utilization']:.1%}")
    print(f"search wall time spent outside merge+forward: {1 - useful * res['utilization']:.1%} (target <= 10 %)")


def test_mean(run_dir: Path, metric: str = "acc") -> float:
    """The best recipe's mean over the test splits of ``metric`` (acc; or logprob, the
    held-out counterpart of the fitness, which does not saturate)."""
    row = json.loads((run_dir / "results.json").read_text())["rows"]["best found"]
    vals = [m[metric] for m in row["scores"].values()]
    return sum(vals) / len(vals)


def best_fitness(run_dir: Path) -> float:
    """The best fitness the run found: what the optimizer maximizes (the search split)."""
    return max(e["fitness"] for e in history(run_dir) if e.get("error") is None)


def cma_vs_random(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="evomerge_cma_vs_random_"))
    figures = ("test mean", "test logprob", "best fitness")
    got: dict[str, dict[str, list[float]]] = {b: {f: [] for f in figures} for b in args.backends}
    for backend, runs in got.items():
        cfg = variant(Path(args.config), root / f"{backend}.yaml", args.zoo,
                      optimizer={"backend": backend, **({"popsize": args.popsize} if args.popsize else {})})
        for seed in args.seeds:
            run_dir = root / f"{backend}_{seed}"
            wall = run_search(cfg, run_dir, "--max-evals", str(args.evals), "--seed", str(seed))
            for name, value in zip(figures, (test_mean(run_dir), test_mean(run_dir, "logprob"), best_fitness(run_dir))):
                runs[name].append(value)
            print(f"{backend:6s} seed {seed}: " + ", ".join(f"{f} {runs[f][-1]:.4f}" for f in figures) + f" ({wall:.0f} s)")
    median = {b: {f: statistics.median(v) for f, v in runs.items()} for b, runs in got.items()}
    for backend in got:
        print(f"{backend:6s} median over seeds {args.seeds}: " + ", ".join(f"{f} {median[backend][f]:.4f}" for f in figures))
    if len(got) == 2:
        print("cma - random (median): "
              + ", ".join(f"{f} {median['cma'][f] - median['random'][f]:+.4f}" for f in figures))


def variant(config: Path, out: Path, zoo: Path | None = None, **sections) -> Path:
    """A copy of ``config`` in ``out`` (a scratch folder, never the repo), its model paths made
    absolute and, with ``zoo``, those in the repository's runs/zoo read from that zoo instead
    (another seed's), with top-level ``sections`` replaced (``optimizer`` merged into the
    original's)."""
    import os

    import yaml

    data = yaml.safe_load(config.read_text())
    here = config.resolve().parent

    def absolute(p: str) -> str:
        if p == "merge" or Path(p).is_absolute():
            return p
        path = Path(os.path.normpath(here / p))  # runs/zoo may be a link: compare unresolved
        if zoo is not None and path.parent == REPO / "runs" / "zoo":
            path = Path(zoo) / path.name
        return str(path.resolve())

    data["base_model"] = absolute(data["base_model"]) if data.get("base_model") else None
    data["models"] = [absolute(m) for m in data["models"]]
    if data.get("dfs", {}).get("sources"):
        data["dfs"]["sources"] = [absolute(m) for m in data["dfs"]["sources"]]
    if "optimizer" in sections:
        sections["optimizer"] = {**data.get("optimizer", {}), **sections["optimizer"]}
    data.update(sections)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def fitness_tokens(config: Path) -> dict[str, tuple[int, int]]:
    """Per evaluator the search uses ("search", and "search_first" / "search_rest" when raced):
    (documents, tokens) it scores per candidate, context + continuation per document."""
    from transformers import AutoTokenizer

    from evomerge.fitness.evaluator import evaluators_for
    from evomerge.space.config import load_search_config

    cfg = load_search_config(str(config))
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    out = {}
    for key, ev in evaluators_for(cfg, test=False).items():
        docs = tokens = 0
        for name, task in ev._task_dict["tasks"].items():
            keep = ev.samples[name] if ev.samples is not None else range(len(task.eval_docs))
            for i in keep:
                doc = task.eval_docs[i]
                text = task.doc_to_text(doc) + task.config.target_delimiter + str(task.doc_to_target(doc))
                docs, tokens = docs + 1, tokens + len(tok(text)["input_ids"])
        out[key] = docs, tokens
    return out


def run_tokens(run_dir: Path, per: dict[str, tuple[int, int]]) -> tuple[int, int, int]:
    """(candidates scored, raced off, forward tokens) of a run, from its history (and the
    finalists fitness.confirm scored on every document)."""
    scored = [e for e in history(run_dir) if not e.get("cached") and e.get("error") is None]
    confirmed = run_dir / "confirmed.json"
    extra = len(json.loads(confirmed.read_text())["finalists"]) * per["confirm"][1] if confirmed.is_file() else 0
    if "search_first" not in per:
        return len(scored), 0, len(scored) * per["search"][1] + extra
    stopped = sum(1 for e in scored if e.get("stage") == "first")
    first, rest = per["search_first"][1], per["search_rest"][1]
    return len(scored), stopped, len(scored) * first + (len(scored) - stopped) * rest + extra


def subsets(args) -> None:
    import yaml

    root = Path(tempfile.mkdtemp(prefix="evomerge_subsets_"))
    base = yaml.safe_load(Path(args.config).read_text())
    sub = {"limit": args.limit, **({"confirm": args.confirm} if args.confirm else {})}
    tag = f", confirm {args.confirm}" if args.confirm else ""
    variants = {"full": {}, f"random {args.limit}{tag}": sub}
    if args.racing:
        racing = {"first": args.racing, "keep": max(2, base["optimizer"]["popsize"] // 4)}
        variants[f"raced {args.racing}/{args.limit}{tag}"] = {**sub, "racing": racing}
    rows = {name: [] for name in variants}
    for k, (name, fitness) in enumerate(variants.items()):
        cfg = variant(Path(args.config), root / f"variant{k}.yaml", args.zoo, fitness={**base["fitness"], **fitness})
        per = fitness_tokens(cfg)
        for seed in args.seeds:
            run_dir = root / f"{k}_{seed}"
            wall = run_search(cfg, run_dir, "--seed", str(seed))
            scored, stopped, tokens = run_tokens(run_dir, per)
            rows[name].append((test_mean(run_dir), tokens, wall))
            print(f"{name:14s} seed {seed}: best test mean {rows[name][-1][0]:.3f}, {scored} candidates "
                  f"({stopped} raced off), {tokens:,} forward tokens, {wall:.0f} s", flush=True)
    med = {n: statistics.median(v[0] for v in r) for n, r in rows.items()}
    for n in rows:
        print(f"{n:14s} median best test mean over seeds {args.seeds}: {med[n]:.3f}")
    full = rows["full"]
    for n, r in list(rows.items())[1:]:
        print(f"{n}: forward tokens full / this {sum(v[1] for v in full) / sum(v[1] for v in r):.2f}x, "
              f"test mean difference (median) {med[n] - med['full']:+.3f}, wall full / this {sum(v[2] for v in full) / sum(v[2] for v in r):.2f}x")


def utilization(args) -> None:
    import os
    import re

    import yaml

    out = Path(tempfile.mkdtemp(prefix="evomerge_utilization_"))
    env = {**os.environ, "EVOMERGE_BENCH_DELAY": f"{args.delay},{args.cv}", "RAY_AUTH_MODE": "disabled"}
    rows = {}
    ahead = "auto" if args.lookahead is None else str(args.lookahead)
    for name, lookahead in (("generational (lookahead 0)", 0), (f"asking ahead (lookahead {ahead})", args.lookahead)):
        opt = {"popsize": args.popsize or 16, "max_evals": args.evals, "seed": 0}
        if lookahead is not None:
            opt["lookahead"] = lookahead
        cfg = variant(Path(args.config), out / f"variant{len(rows)}.yaml", args.zoo, optimizer=opt, test=[],
                      workers={"count": args.workers, "cpus_per_worker": round(2 / args.workers, 3)})
        run_dir = out / f"run_{len(rows)}"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(run_dir), "--quiet"],
                       check=True, env=env)
        wall = time.perf_counter() - t
        frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
        said = re.findall(r"worker utilization ([0-9.]+)%", (run_dir / "search.log").read_text())
        util = float(said[-1]) / 100 if said else float("nan")
        rows[name] = (util, wall, frozen["optimizer"]["lookahead"])
        print(f"{name}: lookahead {rows[name][2]}, worker utilization {util:.1%}, wall {wall:.0f} s", flush=True)
    (g_util, g_wall, _), (a_util, a_wall, _) = rows.values()
    print(f"{args.workers} workers, delays mean {args.delay} s CV {args.cv}: utilization {g_util:.1%} -> {a_util:.1%}, "
          f"wall {g_wall / a_wall:.2f}x shorter")


def pareto(args) -> None:
    import logging

    from evomerge.fitness.env import set_offline_env, set_quiet_env

    set_offline_env()
    set_quiet_env()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.space.config import load_search_config

    root = Path(tempfile.mkdtemp(prefix="evomerge_pareto_"))
    runs = {}
    for name, backend in (("single-objective", None), ("nsga2", "optuna-nsga2")):
        opt = {"max_evals": args.evals, **({"backend": backend, "lookahead": 0} if backend else {})}
        cfg = variant(Path(args.config), root / f"{name}.yaml", args.zoo, optimizer=opt, test=[])
        runs[name] = root / name
        wall = run_search(cfg, runs[name])
        print(f"{name}: {args.evals} evaluations in {wall:.0f} s", flush=True)
    cfg = load_search_config(str(root / "nsga2.yaml"))
    terms = [(t.task, t.metric) for t in cfg.fitness.tasks]
    single = max((e for e in history(runs["single-objective"]) if e["fitness"] is not None), key=lambda e: e["fitness"])
    front = json.loads((runs["nsga2"] / "front.json").read_text())
    print(f"NSGA-II front: {len(front)} members")
    print("| task | single-objective best (eval %d) | best on the front | front - single |" % single["eval_id"])
    print("|---|---|---|---|")
    held = 0
    for k, (task, metric) in enumerate(terms):
        mine = single["scores"][task][metric]
        top = max(m["objectives"][k] for m in front)
        held += top >= mine
        print(f"| {task} {metric} | {mine:.4f} | {top:.4f} | {top - mine:+.4f} |")
    print(f"tasks where the front holds a recipe at least as good: {held} of {len(terms)}")
    evaluator = Evaluator([t for t in cfg.fitness.tasks], batch_size=cfg.fitness.batch_size)
    worst = 0.0
    for m in front:
        out = root / f"export_{m['eval_id']}"
        subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(runs["nsga2"]), "--model", str(out),
                        "--pick", str(m["eval_id"])], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = evaluator.score_dir(out).scores
        worst = max(worst, *(abs(got[t][mt] - v) for (t, mt), v in zip(terms, m["objectives"])))
    print(f"every front member exported and scored again: largest difference from the history {worst:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "cma-vs-random", "subsets", "utilization", "pareto"])
    ap.add_argument("--workers", type=int, default=8, help="utilization: Ray workers")
    ap.add_argument("--delay", type=float, default=1.0, help="utilization: mean injected delay per evaluation (s)")
    ap.add_argument("--cv", type=float, default=0.3, help="utilization: the delays' coefficient of variation")
    ap.add_argument("--popsize", type=int, default=None,
                    help="utilization: population size (default 16); cma-vs-random: both backends' (default: the config's)")
    ap.add_argument("--lookahead", type=int, default=None, help="utilization: the asking-ahead run's lookahead (default: auto)")
    ap.add_argument("--limit", type=int, default=64, help="subsets: documents per task")
    ap.add_argument("--racing", type=int, default=0, help="subsets: also race the subset, this many documents per task first")
    ap.add_argument("--confirm", type=int, default=0, help="subsets: fitness.confirm, this many finalists scored on every document")
    ap.add_argument("--config", default=str(REPO / "search_spaces" / "toy_ps.yaml"))
    ap.add_argument("--zoo", type=Path, default=None,
                    help="read the config's runs/zoo models from this zoo instead (another seed's, `evomerge zoo build DIR --seed N`)")
    ap.add_argument("--evals", type=int, default=60)
    ap.add_argument("--backends", nargs="+", choices=["cma", "random"], default=["cma", "random"],
                    help="cma-vs-random: which to run (random search's draws do not depend on --popsize)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    {"overhead": overhead, "cma-vs-random": cma_vs_random, "subsets": subsets, "utilization": utilization,
     "pareto": pareto}[args.what](args)


if __name__ == "__main__":
    main()
