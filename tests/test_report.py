"""`evomerge report`: each figure drawn from what the run did, read back from the figure itself."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.recipe import load_recipe
from evomerge.run.report import figures, summarize
from evomerge.run.rundir import RunDir

from conftest import search_config


def by_gid(fig, gid: str):
    for ax in fig.axes:
        for artist in [*ax.collections, *ax.lines, *ax.images]:
            if artist.get_gid() == gid:
                return artist
    raise AssertionError(f"no artist {gid!r}")


@pytest.fixture(scope="module")
def ps_run(tiny_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_ps")
    cfg = search_config(tiny_zoo, tmp / "c.yaml", ps={"method": "ties", "split_attn_mlp": True, "layer_granularity": 1},
                        optimizer={"popsize": 4, "max_evals": 8, "seed": 0})
    assert main(["search", str(cfg), "--run-dir", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_fitness_and_terms_figures_hold_every_evaluation(ps_run):
    rd = RunDir(ps_run)
    cfg, history = rd.load_config(), rd.read_history()
    figs = figures(rd, cfg, history)
    points = by_gid(figs["fitness"], "candidates").get_offsets()
    assert len(points) == len(history) == 8
    assert sorted(map(tuple, np.asarray(points))) == sorted((e["eval_id"], e["fitness"]) for e in history)
    # best so far follows eval ids (the order candidates were asked), not the order they landed
    xs, ys = by_gid(figs["fitness"], "best").get_data()
    running = np.maximum.accumulate([e["fitness"] for e in sorted(history, key=lambda e: e["eval_id"])])
    assert list(xs) == sorted(e["eval_id"] for e in history) and np.allclose(ys, running)
    for t in cfg.fitness.tasks:
        _, term = by_gid(figs["terms"], f"term:{t.task}").get_data()
        best = max(history, key=lambda e: (e["fitness"], -e["eval_id"]))
        assert term[-1] == pytest.approx(best["scores"][t.task][t.metric])


def test_heatmaps_are_the_best_recipe_layer_by_source(ps_run):
    rd = RunDir(ps_run)
    cfg, history = rd.load_config(), rd.read_history()
    fig = figures(rd, cfg, history)["recipe"]
    best = load_recipe(ps_run / "best.yaml")
    layers = 2  # the tiny zoo's blocks, one gene group each
    for param in ("weight", "density"):
        for p, part in enumerate(("attn", "mlp", "rest")):
            data = np.asarray(by_gid(fig, f"heatmap:{param}:{part}").get_array())
            assert data.shape == (len(cfg.models), layers)
            for row, member in enumerate(best.models):
                want = member.parameters[param][p].value  # the gradient of this part, one point per layer
                assert np.allclose(data[row], want, atol=1e-6), (param, part, member.model)


def test_report_html_is_self_contained_and_fast(ps_run):
    started = time.perf_counter()
    text = summarize(str(ps_run))
    took = time.perf_counter() - started
    html = (ps_run / "report" / "report.html").read_text()
    pngs = sorted(p.name for p in (ps_run / "report").glob("*.png"))
    assert pngs == ["fitness.png", "recipe.png", "terms.png"]
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "best found" in html and "uniform merge" in html and "worker utilization" in html
    results = json.loads((ps_run / "results.json").read_text())
    assert set(results["search_rows"]) == set(results["rows"])  # every row on both splits
    assert "search mean" in text and "test mean" in text
    assert took < 10


def test_routed_path_is_the_best_recipes_slots(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", dfs={"repeats": 2, "scale_bounds": [0.8, 1.2]},
                        optimizer={"popsize": 4, "max_evals": 8, "seed": 1})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    rd = RunDir(run)
    fig = figures(rd, rd.load_config(), rd.read_history())["route"]
    slots = load_recipe(run / "best.yaml").routing.slots
    xs, ys = by_gid(fig, "path").get_data()
    assert list(ys) == [s.layer for s in slots]
    names = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert [names[int(x)] for x in xs] == [s.source.rstrip("/").rsplit("/", 1)[-1] for s in slots]


def test_front_figure_marks_the_front(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"backend": "optuna-nsga2", "popsize": 4, "max_evals": 8, "seed": 1})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    rd = RunDir(run)
    fig = figures(rd, rd.load_config(), rd.read_history())["front"]
    front = json.loads((run / "front.json").read_text())
    assert sorted(map(tuple, np.asarray(by_gid(fig, "front").get_offsets()))) == sorted(tuple(f["objectives"]) for f in front)


def test_report_beside_a_live_search_leaves_a_torn_line_alone(ps_run, tmp_path):
    import shutil

    run = shutil.copytree(ps_run, tmp_path / "run")
    with open(run / "history.jsonl", "ab") as f:
        f.write(b'{"eval_id": 8, "gen')  # a line the search is writing right now
    before = (run / "history.jsonl").read_bytes()
    assert "8 of 8" in summarize(str(run), plot=False)
    assert (run / "history.jsonl").read_bytes() == before
