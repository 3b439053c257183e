"""The search end to end on the tiny zoo: run dir, resume after kill -9, export, cache, faults, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.recipe import load_recipe
from evomerge.run.search import build_space
from evomerge.space.config import load_search_config

from conftest import search_config, zoo_skills

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"eval_id", "generation", "genome", "recipe_hash", "scores", "fitness", "wall_s", "worker", "error"}


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_in_process_search_run_dir_and_export(tiny_zoo, tmp_path, capsys):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml")
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    for name in ("config.yaml", "history.jsonl", "checkpoint.pkl", "best.yaml", "search.log", "results.md"):
        assert (run / name).is_file(), name
    h = history(run)
    assert len(h) == 12 and all(FIELDS <= set(e) for e in h)
    assert sorted(e["eval_id"] for e in h) == list(range(12))
    assert "best found" in (run / "results.md").read_text()
    assert "are 3 CMA-ES generations, too few" in (run / "search.log").read_text()  # 12 evals at popsize 4
    load_recipe(run / "best.yaml")

    # export -> merge -> eval gives the best entry's scores
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "best.yaml"), "--model", str(tmp_path / "model")]) == 0
    best = max(h, key=lambda e: (e["fitness"], -e["eval_id"]))
    tasks = ",".join(f"{t}:logprob" for t in best["scores"])
    assert main(["eval", str(tmp_path / "model"), "--tasks", tasks, "--subsets", str(run / "subsets.json"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for task, metrics in best["scores"].items():
        for metric, value in metrics.items():
            assert abs(got["scores"][task][metric] - value) < 1e-5, (task, metric)
    assert main(["export", str(run), "--format", "mergekit", "--out", str(tmp_path / "mk.yaml")]) == 0
    mk = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    assert mk["merge_method"] == "task_arithmetic" and "routing" not in mk and "seed" not in mk
    assert main(["report", str(run)]) == 0 and (run / "report" / "report.html").is_file()


def test_ray_search_dfs_and_ps_dfs(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml",
                        dfs={"repeats": 1, "scale_bounds": [0.8, 1.2]},
                        workers={"count": 2}, optimizer={"popsize": 4, "max_evals": 8, "seed": 1})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    h = history(run)
    assert len(h) == 8 and {e["worker"] for e in h if not e.get("cached")} <= {0, 1}
    assert all(e["error"] is None for e in h)
    best = load_recipe(run / "best.yaml")
    assert best.merge_method == "task_arithmetic" and best.routing is not None
    # the folded export loads as an ordinary model
    assert main(["export", str(run), "--model", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert main(["export", str(run), "--format", "mergekit"]) == 2  # routing cannot be said in mergekit


def test_codec_round_trip(tiny_zoo, tmp_path):
    for over in ({}, {"dfs": {"repeats": 2}}, {"dfs": {"scales": False}}, {"ps": {"method": "ties", "split_attn_mlp": True, "layer_granularity": 1}}):
        cfg = load_search_config(search_config(tiny_zoo, tmp_path / "c.yaml", **over))
        space = build_space(cfg)
        rng = np.random.default_rng(0)
        for _ in range(5):
            x = rng.random(space.dim)
            recipe = space.decode(x)
            assert space.decode(space.encode(recipe)) == recipe
            assert recipe.hash() == space.decode(space.encode(recipe)).hash()


def test_identical_recipes_are_scored_once(tiny_zoo, tmp_path):
    # a DFS space over one 2-layer source has few distinct paths, so genomes repeat recipes
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", ps=None, models=[str(tiny_zoo / zoo_skills(tiny_zoo)[0])],
                        dfs={"repeats": 1, "scales": False}, optimizer={"popsize": 6, "max_evals": 18})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    h = history(run)
    scored = [e for e in h if not e.get("cached")]
    assert len(h) == 18 and any(e.get("cached") for e in h)
    assert len(scored) == len({e["recipe_hash"] for e in h})


def _run_search_subprocess(cfg: Path, run: Path, kill_after_lines: int | None):
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(run), "--quiet"]
    if run.exists():
        cmd = [sys.executable, "-m", "evomerge.cli", "resume", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_lines is None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        return
    deadline = time.time() + 120
    hist = run / "history.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and hist.read_text().count("\n") >= kill_after_lines:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_equals_uninterrupted(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 16, "seed": 3})
    ref = tmp_path / "ref"
    _run_search_subprocess(cfg, ref, None)
    run = tmp_path / "run"
    for kill_at in (1, 6, 11):  # inside generation 0, mid generation 1, mid generation 2
        _run_search_subprocess(cfg, run, kill_at)
    _run_search_subprocess(cfg, run, None)
    a = {e["eval_id"]: e for e in history(ref)}
    b = {e["eval_id"]: e for e in history(run)}
    assert sorted(a) == sorted(b) == list(range(16))
    assert len(history(run)) == 16  # nothing recorded twice
    for i in a:
        assert a[i]["genome"] == b[i]["genome"]
        assert a[i]["fitness"] == pytest.approx(b[i]["fitness"], abs=1e-9)


@pytest.mark.parametrize("workers,popsize,backend,want", [
    (0, 16, "cma", 0), (1, 16, "cma", 0),  # no other worker to keep busy
    (2, 16, "cma", 1), (4, 16, "cma", 4), (8, 16, "cma", 10),  # W - 1 + (W - 1) // 2
    (8, 8, "cma", 6), (16, 16, "cma", 12),  # at most three quarters of the population
    (8, 16, "random", 10), (8, 16, "optuna-nsga2", 0),  # a backend that cannot draw ahead
])
def test_auto_lookahead(tiny_zoo, tmp_path, workers, popsize, backend, want):
    from evomerge.run.search import with_lookahead

    cfg = load_search_config(str(search_config(tiny_zoo, tmp_path / "c.yaml", workers={"count": workers},
                                               optimizer={"popsize": popsize, "max_evals": 32, "backend": backend})))
    assert with_lookahead(cfg).optimizer.lookahead == want


@pytest.mark.parametrize("backend,popsize,max_evals,want", [
    ("cma", 16, 64, "set optimizer.popsize to 15 or less, or raise --max-evals above 64"),  # 4 generations
    ("cma", 13, 64, None), ("cma", 8, 64, None), ("cma", 16, 640, None),
    ("cma", 2, 8, "are 4 CMA-ES generations, too few to adapt its search (it may do no better than random "
                  "search); raise --max-evals above 8"),  # no smaller population to suggest
    ("random", 16, 64, None),  # nothing to adapt
])
def test_a_budget_of_four_cma_generations_or_fewer_gets_a_note(backend, popsize, max_evals, want):
    from evomerge.run.search import budget_note
    from evomerge.space.config import OptimizerConfig

    cfg = load_search_config(str(REPO / "search_spaces" / "toy_ps.yaml"))
    cfg = cfg.model_copy(update={"optimizer": OptimizerConfig(backend=backend, popsize=popsize, max_evals=max_evals)})
    note = budget_note(cfg)
    assert note == want if want is None else want in note


def test_asking_ahead_on_ray_workers_resumes_after_kill_to_the_same_history(tiny_zoo, tmp_path):
    """Two Ray workers: each generation's first candidate is drawn ahead (lookahead auto = 1)
    and scored while the generation before it finishes. Killed inside generations, resumed,
    the history is the uninterrupted run's, each candidate once."""
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", workers={"count": 2},
                        optimizer={"popsize": 4, "max_evals": 16, "seed": 5})
    ref = tmp_path / "ref"
    _run_search_subprocess(cfg, ref, None)
    frozen = yaml.safe_load((ref / "config.yaml").read_text())
    assert frozen["optimizer"]["lookahead"] == 1
    run = tmp_path / "run"
    for kill_at in (2, 7, 10):
        _run_search_subprocess(cfg, run, kill_at)
    _run_search_subprocess(cfg, run, None)
    a = {e["eval_id"]: e for e in history(ref)}
    b = {e["eval_id"]: e for e in history(run)}
    assert sorted(a) == sorted(b) == list(range(16)) and len(history(run)) == len(history(ref)) == 16
    for i in a:
        assert a[i]["genome"] == b[i]["genome"]
        assert a[i]["fitness"] == pytest.approx(b[i]["fitness"], abs=1e-9)


def test_resume_refuses_changed_config(tiny_zoo, tmp_path, capsys):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 4})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    changed = search_config(tiny_zoo, tmp_path / "c2.yaml", optimizer={"popsize": 6, "max_evals": 4})
    capsys.readouterr()
    assert main(["search", str(changed), "--run-dir", str(run), "--resume", "--quiet"]) == 2
    assert "popsize" in capsys.readouterr().err


def test_killed_ray_actor_is_replaced_and_candidate_rerun(tiny_zoo, tmp_path):
    import ray

    from evomerge.space.config import load_search_config
    from evomerge.workers.pool import RayPool

    cfg = load_search_config(search_config(tiny_zoo, tmp_path / "c.yaml"))
    space = build_space(cfg)
    recipe = space.decode(np.full(space.dim, 0.5)).to_dict()
    pool = RayPool(cfg.model_dump(mode="json"), count=1)
    try:
        victim = pool.actors[0]
        pool.submit("a", recipe)
        ray.kill(victim, no_restart=True)  # dies mid-evaluation
        out = pool.next_outcome()
        assert out.result is None and out.worker_died
        assert victim not in pool.actors and len(pool.actors) == 1
        pool.submit("a", recipe)
        again = pool.next_outcome()
        assert again.result is not None and again.result["fitness"] < 0
    finally:
        pool.close()
    assert not ray.is_initialized()


@pytest.mark.parametrize("over, fragment", [
    ({"models": ["/nowhere/model"]}, "does not exist"),
    ({"fitness": {"tasks": [{"task": "sft_serch"}]}}, "did you mean 'sft_search'"),
    ({"ps": {"method": "task_arithmetic", "tune": {"weight": [1.0, 0.5]}}}, "low < high"),
    ({"optimizer": {"popsize": 1}}, "popsize"),
    ({"workers": {"count": 1, "gpus_per_worker": 1}}, "GPU"),
    ({"ps": {"method": "tie"}}, "did you mean 'ties'"),
    ({"optimizer": {"backend": "optuna-nsga2"}, "fitness": {"tasks": [{"task": "mir_search"}]}}, "two or more tasks"),
    ({"optimizer": {"patience": 0}}, "patience"),
    ({"fitness": {"tasks": [{"task": "mir_search"}], "limit": 5, "limits": {"sft_search": 3}}}, "limits name 'sft_search'"),
    ({"fitness": {"tasks": [{"task": "mir_search"}], "confirm": 2}}, "needs fitness.limit"),
])
def test_bad_search_input_refused(tiny_zoo, tmp_path, capsys, over, fragment):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", **over)
    capsys.readouterr()
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_existing_run_dir_without_resume_refused(tiny_zoo, tmp_path, capsys):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x")
    capsys.readouterr()
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    assert "resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == "x"


def test_raising_max_evals_on_resume_continues_the_same_trajectory(tiny_zoo, tmp_path, capsys):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 16, "seed": 5})
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(ref), "--quiet"]) == 0
    assert main(["search", str(cfg), "--run-dir", str(run), "--max-evals", "8", "--quiet"]) == 0
    assert len(history(run)) == 8
    capsys.readouterr()
    assert main(["resume", str(run), "--max-evals", "4", "--quiet"]) == 2  # below what is done
    assert "below the 8 evaluations" in capsys.readouterr().err
    assert main(["resume", str(run), "--max-evals", "16", "--quiet"]) == 0
    assert [e["genome"] for e in history(run)] == [e["genome"] for e in history(ref)]
    assert load_search_config(run / "config.yaml").optimizer.max_evals == 16
    # the fitness's documents: a seeded random subset per task, recorded, the same in both runs
    subsets = json.loads((run / "subsets.json").read_text())
    assert subsets == json.loads((ref / "subsets.json").read_text())
    assert all(len(v) == 6 and v != list(range(6)) for v in subsets.values())


def test_patience_and_wall_time_stop_a_run_at_a_generation_end(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 400, "seed": 0, "patience": 1})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    h = history(run)
    best = max(h, key=lambda e: e["fitness"])
    last = max(e["generation"] for e in h)
    assert last == best["generation"] + 1 and len(h) == 4 * (last + 1) < 400
    assert "no improvement for 1 generations (patience 1)" in (run / "search.log").read_text()
    assert (run / "results.md").is_file()  # a stopped run still ends with its table

    cfg = search_config(tiny_zoo, tmp_path / "w.yaml", optimizer={"popsize": 4, "max_evals": 400, "max_wall_s": 0.01})
    run = tmp_path / "wall"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    assert len(history(run)) == 4 and "reached max_wall_s" in (run / "search.log").read_text()

    # `evomerge runs` lists both, with how they ended
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text((run / "config.yaml").read_text())
    (tmp_path / "fresh" / "search.log").write_text("search started\n")  # killed before its first candidate
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["runs", str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in out.getvalue().splitlines()[2:]}
    assert "stopped early" in rows[str(tmp_path / "run")] and "stopped early" in rows[str(tmp_path / "wall")]
    assert "4/400" in rows[str(tmp_path / "wall")] and "crashed" in rows[str(tmp_path / "fresh")]


def test_nsga2_keeps_the_pareto_front_and_exports_any_member(tiny_zoo, tmp_path, capsys):
    from evomerge.run.front import dominates

    opt = {"backend": "optuna-nsga2", "popsize": 4, "max_evals": 12, "seed": 1}
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer=opt)
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    # resumed with a raised budget: the same trajectory as one uninterrupted run
    assert main(["search", str(cfg), "--run-dir", str(ref), "--max-evals", "8", "--quiet"]) == 0
    assert main(["resume", str(ref), "--max-evals", "12", "--quiet"]) == 0
    assert [e["genome"] for e in history(ref)] == [e["genome"] for e in history(run)]

    front = json.loads((run / "front.json").read_text())
    assert front and all(len(m["objectives"]) == 2 for m in front)
    vecs = [m["objectives"] for m in front]
    assert not any(dominates(a, b) for a in vecs for b in vecs)
    scored = [[e["scores"][t][m] for t, m in ((t, "logprob") for t in e["scores"])] for e in history(run)]
    assert all(any(dominates(v, s) or v == s for v in vecs) for s in scored)  # every candidate is matched or beaten

    capsys.readouterr()
    member = front[-1]
    assert main(["export", str(run), "--pick", str(member["eval_id"]), "--out", str(tmp_path / "m.yaml")]) == 0
    assert f"eval {member['eval_id']}," in (tmp_path / "m.yaml").read_text()
    top_first = max(front, key=lambda m: (m["objectives"][0], -m["eval_id"]))
    assert main(["export", str(run), "--weights", "1,0", "--out", str(tmp_path / "w.yaml")]) == 0
    assert f"eval {top_first['eval_id']}," in (tmp_path / "w.yaml").read_text()
    assert main(["export", str(run), "--weights", "1,0,2"]) == 2
    assert "--weights takes 2 non-negative numbers" in capsys.readouterr().err


def test_racing_stops_hopeless_candidates_and_scores_survivors_in_full(tiny_zoo, tmp_path):
    from evomerge.run.racing import race_for
    from evomerge.space.config import RacingConfig

    a, b = zoo_skills(tiny_zoo)[:2]
    tasks = [{"task": f"{a}_search", "metric": "logprob"}, {"task": f"{b}_search", "metric": "logprob"}]
    racing = {"first": 6, "keep": 2, "confidence": 0.5, "warmup": 1}
    opt = {"popsize": 4, "max_evals": 24, "seed": 2}
    raced = search_config(tiny_zoo, tmp_path / "r.yaml", fitness={"tasks": tasks, "limit": 20, "racing": racing}, optimizer=opt)
    plain = search_config(tiny_zoo, tmp_path / "p.yaml", fitness={"tasks": tasks, "limit": 20}, optimizer=opt)
    run, ref, part = tmp_path / "run", tmp_path / "ref", tmp_path / "part"
    for cfg, d in ((raced, run), (plain, ref)):
        assert main(["search", str(cfg), "--run-dir", str(d), "--quiet"]) == 0
    h, p = history(run), history(ref)
    # warm-up: both stages for everyone, combined into exactly the plain search's fitness
    for e, f in zip(h[:4], p[:4]):
        assert e["stage"] == "full" and e["genome"] == f["genome"] and e["docs"] == 40
        assert e["fitness"] == pytest.approx(f["fitness"], abs=1e-9)
    stopped = [e for e in h if e["stage"] == "first"]
    assert stopped and all(e["docs"] == 12 for e in stopped)
    for e in stopped:  # each stop is the rule applied to the history before its generation
        race = race_for(h, e["generation"], RacingConfig(**racing))
        assert e["first_fitness"] == e["fitness"] and e["fitness"] + race["margin"] < race["threshold"]
    best = max((e for e in h if e["stage"] == "full"), key=lambda e: (e["fitness"], -e["eval_id"]))
    assert main(["export", str(run), "--out", str(tmp_path / "best.yaml")]) == 0  # a full score, never a stopped one
    assert f"eval {best['eval_id']}," in (tmp_path / "best.yaml").read_text()
    # a resumed raced run races as an uninterrupted one
    assert main(["search", str(raced), "--run-dir", str(part), "--max-evals", "12", "--quiet"]) == 0
    assert main(["resume", str(part), "--max-evals", "24", "--quiet"]) == 0
    assert [(e["genome"], e["stage"]) for e in history(part)] == [(e["genome"], e["stage"]) for e in h]


def test_confirm_picks_the_best_on_every_document_among_the_subset_finalists(tiny_zoo, tmp_path, capsys):
    """fitness.confirm: the top recipes by subset fitness are scored on whole splits, and the
    best of them there is what export writes; a resumed finished run does not score them again."""
    import evomerge
    from evomerge.run.confirm import finalists

    a, b = zoo_skills(tiny_zoo)[:2]
    tasks = [{"task": f"{a}_search", "metric": "logprob"}, {"task": f"{b}_search", "metric": "logprob"}]
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", fitness={"tasks": tasks, "limit": 4, "confirm": 3})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    h = history(run)
    confirmed = json.loads((run / "confirmed.json").read_text())["finalists"]
    assert [c["eval_id"] for c in confirmed] == [e["eval_id"] for e in finalists(h, 3)]
    assert len({c["recipe_hash"] for c in confirmed}) == 3
    space = build_space(load_search_config(str(run / "config.yaml")))
    spec = [f"{t['task']}:logprob" for t in tasks]
    for c in confirmed:  # each finalist's whole-split fitness is its merged model's, on every document
        entry = next(e for e in h if e["eval_id"] == c["eval_id"])
        model = evomerge.merge(space.decode(np.array(entry["genome"])).to_dict(), tmp_path / f"m{c['eval_id']}")
        assert evomerge.evaluate(model, spec).fitness == pytest.approx(c["fitness"], abs=1e-6)
        assert c["subset_fitness"] == entry["fitness"]
    top = max(confirmed, key=lambda c: (c["fitness"], -c["eval_id"]))
    assert main(["export", str(run), "--out", str(tmp_path / "best.yaml")]) == 0
    assert f"eval {top['eval_id']}," in (tmp_path / "best.yaml").read_text()
    assert json.loads((run / "results.json").read_text())["best_eval_id"] == top["eval_id"]
    before = (run / "confirmed.json").stat().st_mtime_ns
    assert main(["resume", str(run), "--quiet"]) == 0
    assert (run / "confirmed.json").stat().st_mtime_ns == before
