"""The data-dependent methods as recipe methods run by `evomerge merge`, alignment, and
`evomerge barrier`: tiny real models, real lm-eval task documents as calibration data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_yaml


@pytest.fixture(scope="session")
def stats_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stats_cache")


def evomerge(*args: str, cache: Path | None = None):
    return run_cli(*args, env={"EVOMERGE_CACHE": str(cache)} if cache else None)


def calib_jsonl(path: Path, n: int = 32) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(f"t{(3 * i + k) % 40 + 2}" for k in range(8))}) + "\n" for i in range(n)))
    return path


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_identical_models_give_that_model(family, tmp_path, stats_cache, method):
    a = family["llama"]["a"]
    recipe = write_yaml(tmp_path / "r.yaml", {
        "merge_method": method, "models": [{"model": str(a)}, {"model": str(a) + "/"}],
        "calibration": {"data": str(calib_jsonl(tmp_path / "c.jsonl"))}})
    done = evomerge("merge", str(recipe), str(tmp_path / "out"), "--quiet", cache=stats_cache)
    assert done.returncode == 0, done.stderr
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(a / "model.safetensors")
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_regmean_and_fisher_differ_from_averaging_and_are_reproducible(family, tmp_path, stats_cache, arch):
    fam = family[arch]
    data = str(calib_jsonl(tmp_path / "c.jsonl"))
    outs = {}
    for method in ("linear", "fisher", "regmean"):
        models = [{"model": str(fam["a"]), "parameters": {"weight": 1.0}}, {"model": str(fam["b"]), "parameters": {"weight": 1.0}}]
        recipe = {"merge_method": method, "models": models}
        if method != "linear":
            recipe["calibration"] = {"data": data}
        path = write_yaml(tmp_path / f"{method}.yaml", recipe)
        done = evomerge("merge", str(path), str(tmp_path / method), "--quiet", cache=stats_cache)
        assert done.returncode == 0, done.stderr
        outs[method] = load_file(tmp_path / method / "model.safetensors")
    weight = next(n for n in outs["linear"] if n.endswith(("mlp.down_proj.weight", "mlp.c_proj.weight")))
    norm = next(n for n in outs["linear"] if n.endswith(("input_layernorm.weight", "ln_1.weight")))
    assert not torch.allclose(outs["regmean"][weight], outs["linear"][weight])
    assert not torch.allclose(outs["fisher"][weight], outs["linear"][weight])
    torch.testing.assert_close(outs["regmean"][norm], outs["linear"][norm])  # no Gram: averaged
    # the second run reads the cached statistics and writes the same tensors
    again = evomerge("merge", str(tmp_path / "regmean.yaml"), str(tmp_path / "again"), "--quiet", cache=stats_cache)
    assert again.returncode == 0, again.stderr
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")[weight], outs["regmean"][weight])


def test_zipit_recipe_writes_a_loadable_model(family, tmp_path, stats_cache):
    fam = family["llama"]
    recipe = write_yaml(tmp_path / "z.yaml", {
        "merge_method": "zipit", "models": [{"model": str(fam["a"])}, {"model": str(fam["b"])}],
        "parameters": {"ratio": 0.5}, "calibration": {"data": str(calib_jsonl(tmp_path / "c.jsonl"))}})
    done = evomerge("merge", str(recipe), str(tmp_path / "out"), "--quiet", cache=stats_cache)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == 64 + 32  # 2n - 0.5 n units per layer
    out = logits(tmp_path / "out", torch.arange(2, 10)[None])
    assert torch.isfinite(out).all()


def test_align_keeps_the_function_and_moves_the_weights(family, tmp_path):
    from evomerge.align.permspec import apply_permutation, random_permutation

    fam = family["llama"]
    from evomerge.io.model_dir import ModelDir

    md = ModelDir(fam["a"])
    perms = random_permutation(md.config, torch.Generator().manual_seed(3))
    permuted = apply_permutation(md.load_all(), md.config, perms)
    shuffled = tmp_path / "shuffled"
    import shutil

    shutil.copytree(fam["a"], shuffled)
    from safetensors.torch import save_file

    save_file(permuted, shuffled / "model.safetensors", metadata={"format": "pt"})
    ids = torch.arange(2, 12)[None]
    torch.testing.assert_close(logits(shuffled, ids), logits(fam["a"], ids), rtol=1e-4, atol=1e-4)
    done = evomerge("align", str(fam["a"]), str(shuffled), str(tmp_path / "back"), "--quiet")
    assert done.returncode == 0, done.stderr
    back, orig = load_file(tmp_path / "back" / "model.safetensors"), load_file(fam["a"] / "model.safetensors")
    for name, t in orig.items():
        torch.testing.assert_close(back[name], t, rtol=1e-6, atol=1e-6)


def ends(path):
    return path["points"][0]["loss"], path["points"][-1]["loss"]  # aligned B keeps B's function


def test_barrier_prints_plots_and_shrinks_after_alignment(family, tmp_path):
    """Two independently initialized tiny llamas: activation matching puts B in A's units,
    which lowers the midpoint."""
    a, b = family["llama"]["base"], tmp_path / "other"
    from conftest import make_model

    make_model(b, "llama", seed=99)
    data = calib_jsonl(tmp_path / "c.jsonl")
    done = evomerge("barrier", str(a), str(b), "--data", str(data), "--align", "activation-perm", "--align", "activation",
                    "--points", "5", "--out", str(tmp_path / "bar"), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "bar" / "barrier.json").read_text())
    given, permuted, aligned = report["paths"]
    assert [given["label"], permuted["label"], aligned["label"]] == [
        "as given", "activation matching, permutations only", "activation matching + rotations"]
    # the path as given is the same with or without alignments asked for
    plain = evomerge("barrier", str(a), str(b), "--data", str(data), "--points", "5", "--out", str(tmp_path / "plain"), "--quiet")
    assert plain.returncode == 0, plain.stderr
    assert json.loads((tmp_path / "plain" / "barrier.json").read_text())["paths"][0] == given
    assert report["method"] == "linear"
    for p in permuted, aligned:
        assert ends(p) == pytest.approx(ends(given), rel=1e-5)
    assert [p["t"] for p in given["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # (random, untrained models: what rotations do to their midpoint says nothing; the trained
    # pair's figures are bench/toolbox_table.py's)
    assert permuted["midpoint_barrier"] < given["midpoint_barrier"]
    assert (tmp_path / "bar" / "barrier.png").stat().st_size > 10_000
    assert "barrier" in done.stdout


def test_barrier_height_is_the_rise_above_the_chord():
    from evomerge.landscape.barrier import barrier_height

    assert barrier_height([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier_height([0, 0.5, 1], [1.0, 1.0, 2.0]) == 0.0


@pytest.mark.parametrize("calibration,expected", [
    ({"data": "missing.jsonl"}, "missing.jsonl"),
    ({"data": "bad.jsonl"}, "line 2"),
    ({"data": "nofield.jsonl"}, "field"),
    ({"data": "few.jsonl"}, "min_examples"),
    ({"task": "mir_serch"}, "mir_search"),
    (None, "calibration"),
])
def test_bad_calibration_is_one_line_exit_2_nothing_written(family, tmp_path, calibration, expected):
    (tmp_path / "bad.jsonl").write_text('{"text": "t2 t3"}\nnot json\n')
    (tmp_path / "nofield.jsonl").write_text("".join('{"body": "t2 t3"}\n' for _ in range(20)))
    (tmp_path / "few.jsonl").write_text('{"text": "t2 t3"}\n')
    fam = family["llama"]
    recipe = {"merge_method": "regmean", "models": [{"model": str(fam["a"])}, {"model": str(fam["b"])}]}
    if calibration:
        recipe["calibration"] = {k: (str(tmp_path / v) if k == "data" else v) for k, v in calibration.items()}
    path = write_yaml(tmp_path / "r.yaml", recipe)
    done = evomerge("merge", str(path), str(tmp_path / "out"), cache=tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_activation_alignment_needs_calibration_and_stats_refuse_align(family, tmp_path):
    fam = family["llama"]
    models = [{"model": str(fam["a"]), "parameters": {"weight": 1.0}}, {"model": str(fam["b"]), "parameters": {"weight": 1.0}}]
    for recipe, expected in (
        ({"merge_method": "linear", "models": models, "align": {"method": "activation"}}, "calibration"),
        ({"merge_method": "fisher", "models": models, "align": {"method": "weight"},
          "calibration": {"data": str(calib_jsonl(tmp_path / "c.jsonl"))}}, "evomerge align"),
    ):
        path = write_yaml(tmp_path / "r.yaml", recipe)
        done = evomerge("merge", str(path), str(tmp_path / "out"))
        assert done.returncode == 2 and expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,tuned", [("regmean", "alpha"), ("fisher", "weight")])
def test_search_tunes_a_data_dependent_method_and_scores_its_export(tiny_zoo, tmp_path, stats_cache, method, tuned):
    """The statistics are computed once on the driver (cached), held by the worker, and the
    best candidate's history scores equal `evomerge eval` of its export."""
    from conftest import search_config, zoo_skills

    a = zoo_skills(tiny_zoo)[0]
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", ps={"method": method, "layer_granularity": 0},
                        calibration={"task": f"{a}_search", "limit": 32},
                        optimizer={"popsize": 4, "max_evals": 4, "seed": 0})
    run = tmp_path / "run"
    done = evomerge("search", str(cfg), "--run-dir", str(run), "--quiet", cache=stats_cache)
    assert done.returncode == 0, done.stderr
    h = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len({json.dumps(e["genome"]) for e in h}) == 4 and all(e["error"] is None for e in h)
    best = (run / "best.yaml").read_text()
    assert tuned in best and "calibration" in best
    assert len(list(stats_cache.glob(f"stats/{'gram' if method == 'regmean' else 'fisher'}-*.safetensors"))) >= 2
    assert evomerge("export", str(run), "--model", str(tmp_path / "model"), cache=stats_cache).returncode == 0
    top = max(h, key=lambda e: (e["fitness"], -e["eval_id"]))
    tasks = ",".join(f"{t}:logprob" for t in top["scores"])
    got = evomerge("eval", str(tmp_path / "model"), "--tasks", tasks, "--subsets", str(run / "subsets.json"), "--json")
    assert got.returncode == 0, got.stderr
    scores = json.loads(got.stdout.strip().splitlines()[-1])["scores"]
    for task, metrics in top["scores"].items():
        assert scores[task]["logprob"] == pytest.approx(metrics["logprob"], rel=1e-5), task


def test_search_refuses_zipit_and_stats_without_calibration(tiny_zoo, tmp_path):
    from conftest import search_config

    for ps, expected in (({"method": "zipit"}, "whole models"), ({"method": "fisher"}, "calibration")):
        cfg = search_config(tiny_zoo, tmp_path / "c.yaml", ps=ps)
        done = evomerge("search", str(cfg), "--run-dir", str(tmp_path / "run"))
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert not (tmp_path / "run").exists()


def test_each_model_may_bring_its_own_calibration(family, tmp_path, stats_cache):
    """Fisher merging and RegMean compute each model's statistics on its own task's data:
    a model's calibration: overrides the recipe's, and changes the merge."""
    fam = family["llama"]
    shared, own = calib_jsonl(tmp_path / "shared.jsonl"), tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"text": " ".join(f"t{(7 * i + k) % 11 + 30}" for k in range(8))}) + "\n" for i in range(32)))
    outs = {}
    for name, models in (("shared", [{"model": str(fam["a"])}, {"model": str(fam["b"])}]),
                         ("own", [{"model": str(fam["a"]), "calibration": {"data": str(own)}}, {"model": str(fam["b"])}])):
        path = write_yaml(tmp_path / f"{name}.yaml", {"merge_method": "regmean", "models": models,
                                                      "calibration": {"data": str(shared)}})
        done = evomerge("merge", str(path), str(tmp_path / name), "--quiet", cache=stats_cache)
        assert done.returncode == 0, done.stderr
        outs[name] = load_file(tmp_path / name / "model.safetensors")
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(outs["shared"][w], outs["own"][w])
