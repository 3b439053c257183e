"""A fitness function in place of lm-eval tasks, on the tiny zoo: named by a config
(imported on each worker) or passed to evomerge.search as a callable (sent by value)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import fitness_fns
from conftest import search_config, zoo_skills
from evomerge.cli import main
from evomerge.space.config import FUNCTION_TERM, load_search_config


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@contextmanager
def one_thread():
    """The thread count of a one-CPU Ray worker: the tiny zoo's forward bits depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def score_dir(fn, model_dir: Path):
    with one_thread():
        return fn(*load(model_dir))


def test_config_function_on_ray_workers_scores_what_export_writes(tiny_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)  # a user's module in the working directory: the workers import it too
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", fitness={"function": "fitness_fns:nll_and_norm"},
                        workers={"count": 2}, optimizer={"popsize": 4, "max_evals": 8, "seed": 0})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--max-evals", "4", "--quiet"]) == 0
    assert main(["resume", str(run), "--max-evals", "8", "--quiet"]) == 0  # the frozen import path, again
    h = history(run)
    assert len(h) == 8 and all(e["error"] is None for e in h)
    assert {e["worker"] for e in h if not e["cached"]} <= {0, 1}
    assert all(set(e["scores"]) == {"function"} and e["scores"]["function"]["fitness"] == e["fitness"] for e in h)
    assert len({e["fitness"] for e in h}) > 1
    frozen = load_search_config(run / "config.yaml").fitness
    assert frozen.function == "fitness_fns:nll_and_norm" and not frozen.by_value and frozen.tasks == [FUNCTION_TERM]
    assert not (run / "subsets.json").exists()  # a function scores no documents

    # the best, exported and loaded: the function gives the history's very numbers
    assert main(["export", str(run), "--model", str(tmp_path / "best")]) == 0
    best = max(h, key=lambda e: (e["fitness"], -e["eval_id"]))
    assert score_dir(fitness_fns.nll_and_norm, tmp_path / "best") == best["scores"]["function"]
    # and the worst, merged from its genome as export merges
    import evomerge
    from evomerge.run.search import build_space

    worst = min(h, key=lambda e: e["fitness"])
    recipe = build_space(load_search_config(run / "config.yaml")).decode(np.array(worst["genome"]))
    evomerge.merge(recipe, tmp_path / "worst")
    assert score_dir(fitness_fns.nll_and_norm, tmp_path / "worst") == worst["scores"]["function"]

    # the test: section's lm-eval tasks, and the report's tables, as for a task fitness
    results = json.loads((run / "results.json").read_text())
    assert set(results["rows"]["best found"]["scores"]) == {f"{skill}_test" for skill in zoo_skills(tiny_zoo)[:2]}
    assert results["search_rows"]["best found"]["fitness"] == best["fitness"]
    assert main(["report", str(run)]) == 0 and (run / "report" / "report.html").is_file()


def test_api_callable_in_process_and_on_ray_workers(tiny_zoo, tmp_path, capsys):
    import evomerge

    calls = []
    text = "k:abh>hga"

    def score(model, tokenizer):  # a closure of this test: Ray sends it by value
        calls.append(text)
        ids = tokenizer(text, return_tensors="pt").input_ids
        return -float(model(input_ids=ids, labels=ids).loss)

    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", test=[],
                        optimizer={"popsize": 4, "max_evals": 8, "seed": 3, "lookahead": 0})
    with one_thread():  # the Ray workers' thread count, so both runs' numbers can be compared exactly
        local = evomerge.search(cfg, run_dir=tmp_path / "local", workers=0, fitness=score)
    scored = [e for e in local.history() if not e["cached"]]
    assert len(calls) == len(scored) > 0  # in-process: called directly, in this process

    ray_run = evomerge.search(cfg, run_dir=tmp_path / "ray", workers=2, max_evals=4, fitness=score)
    assert len(calls) == len(scored)  # the workers called their own copies
    with pytest.raises(evomerge.UserError, match=r"fitness=fn"):
        evomerge.resume(ray_run.path)
    with pytest.raises(evomerge.UserError, match="not .*neg_nll"):
        evomerge.resume(ray_run.path, fitness=fitness_fns.neg_nll)
    capsys.readouterr()
    assert main(["resume", str(ray_run.path), "--quiet"]) == 2
    assert "evomerge.resume(RUN_DIR, fitness=fn)" in capsys.readouterr().err
    evomerge.resume(ray_run.path, max_evals=8, fitness=score)

    frozen = load_search_config(ray_run.path / "config.yaml").fitness
    assert frozen.function == f"{__name__}:test_api_callable_in_process_and_on_ray_workers.<locals>.score"
    assert frozen.by_value and frozen.tasks == [FUNCTION_TERM] and frozen.limit is None  # the tasks' limit went with them
    here, there = (sorted(r.history(), key=lambda e: e["eval_id"]) for r in (local, ray_run))
    assert [e["genome"] for e in here] == [e["genome"] for e in there]
    assert [e["fitness"] for e in here] == [e["fitness"] for e in there]
    assert {e["worker"] for e in there if not e["cached"]} == {0, 1}
    recipe, entry = ray_run.best()
    assert entry["fitness"] == max(e["fitness"] for e in there) and ray_run.front()[0]["fitness"] == entry["fitness"]
    evomerge.merge(recipe, tmp_path / "best")
    assert score_dir(score, tmp_path / "best") == entry["fitness"]
    with pytest.raises(evomerge.UserError, match="callable"):
        evomerge.search(cfg, run_dir=tmp_path / "bad", fitness="fitness_fns:neg_nll")


def test_a_bad_return_is_that_candidates_error(tiny_zoo, tmp_path):
    """Calls 1, 2, 3 and 5 return what is not a finite number: those candidates fail, once
    each (a function's error is the candidate's, never retried), and the search goes on."""
    import evomerge

    bad = {1: float("nan"), 2: "high", 3: {"norm": 1.0}, 5: True}
    seen = []

    def flaky(model, tokenizer):
        seen.append(len(seen))
        return bad.get(seen[-1], fitness_fns.neg_nll(model, tokenizer))

    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", test=[], optimizer={"popsize": 4, "max_evals": 8, "seed": 0})
    run = evomerge.search(cfg, run_dir=tmp_path / "run", fitness=flaky)
    h = {e["eval_id"]: e for e in run.history()}
    assert len(h) == 8 and len(seen) == 8 and not any(e["cached"] for e in h.values())
    fragments = {1: "returned nan; it must be finite", 2: "returned 'high' (str)", 3: "without 'fitness'",
                 5: "returned True (bool)"}
    for i, e in h.items():
        if i in fragments:
            assert e["fitness"] is None and e["scores"] is None and fragments[i] in e["error"], e
            assert e["error"].startswith("UserError: fitness function ")
        else:
            assert e["error"] is None and e["fitness"] == e["scores"]["function"]["fitness"]


@pytest.mark.parametrize("fitness, fragment", [
    ({"tasks": [{"task": "mir_search"}], "function": "fitness_fns:neg_nll"}, "not both"),
    ({}, "at least one task, or a function"),
    ({"function": "fitness_fns"}, "package.module:name"),
    ({"function": "fitness_fns:neg_nll", "limit": 5}, "fitness.limit"),
    ({"function": "no_such_module:score"}, "cannot import no_such_module"),
    ({"function": "fitness_fns:nowhere"}, "fitness_fns has no nowhere"),
    ({"function": "fitness_fns:TEXTS"}, "not a function"),
])
def test_bad_fitness_sections_refused_up_front(tiny_zoo, tmp_path, capsys, fitness, fragment):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", fitness=fitness)
    capsys.readouterr()
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "run").exists()
