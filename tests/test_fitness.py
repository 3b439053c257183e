"""The fitness evaluator against real lm-eval on the tiny zoo."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import UserError
from evomerge.fitness.evaluator import Evaluator, default_task_path
from evomerge.fitness.terms import FitnessTerm, Result, parse_terms
from evomerge.zoo.build import build_zoo

from conftest import lm_eval_cli

TASKS = ["mir_test", "srt_test"]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    return build_zoo(tmp_path_factory.getbasetemp() / "tiny_zoo", preset="tiny", progress=False)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return Evaluator([FitnessTerm(t, "acc") for t in TASKS] + [FitnessTerm("srt_test", "logprob", 0.5)])


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def assert_same_scores(a: Result, b: Result) -> None:
    assert a.scores.keys() == b.scores.keys()
    for task in a.scores:
        assert a.scores[task]["acc"] == b.scores[task]["acc"], task
        assert math.isclose(a.scores[task]["logprob"], b.scores[task]["logprob"], rel_tol=1e-5), task


def test_scores_equal_lm_eval_cli(tiny_zoo, evaluator, tmp_path):
    model_dir = tiny_zoo / "srt"
    cli = lm_eval_cli(f"pretrained={model_dir}", TASKS, tmp_path)

    ours = evaluator.score_dir(model_dir)
    for task in TASKS:
        assert ours.scores[task]["acc"] == cli[task]["acc,none"], task
        assert math.isclose(ours.scores[task]["logprob"], cli[task]["logprob,none"], rel_tol=1e-5), task
    assert ours.scores["srt_test"]["acc"] > 0  # the comparison sees real hits, not only zeros
    acc = ours.scores
    expected = (acc["mir_test"]["acc"] + acc["srt_test"]["acc"] + 0.5 * acc["srt_test"]["logprob"]) / 2.5
    assert math.isclose(ours.fitness, expected)


def test_weights_written_in_place_score_like_a_fresh_evaluator(tiny_zoo, evaluator):
    model, tok = load(tiny_zoo / "base")
    first = evaluator.score_model(model, tok)
    again = evaluator.score_model(model, tok)  # the reused task dict holds no stale requests
    assert again == first
    assert all(len(t.instances) == 200 for t in evaluator._task_dict["tasks"].values())

    srt = AutoModelForCausalLM.from_pretrained(tiny_zoo / "srt").state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(srt[name])
    swapped = evaluator.score_model(model, tok)
    assert swapped.scores != first.scores

    fresh = Evaluator(evaluator.terms)
    assert_same_scores(swapped, fresh.score_dir(tiny_zoo / "srt"))
    assert_same_scores(first, fresh.score_dir(tiny_zoo / "base"))


def test_groups_and_limit(tiny_zoo):
    ev = Evaluator(parse_terms("zoo_search,mir_search:logprob"), limit=20)
    result = ev.score_dir(tiny_zoo / "mir")
    members = [result.scores[f"{s}_search"]["acc"] for s in ("mir", "sft", "srt")]
    assert math.isclose(result.scores["zoo_search"]["acc"], sum(members) / 3)
    assert all(len(t.instances) == 20 for t in ev._task_dict["tasks"].values())
    assert all(round(m * 20) == m * 20 for m in members)


def test_random_subsets_are_seeded_fixed_and_scored_like_lm_eval(tiny_zoo, tmp_path):
    terms = parse_terms("mir_test,srt_test,srt_test:logprob")
    ev = Evaluator(terms, limit=30, subset="random", subset_seed=3)
    assert ev.samples == Evaluator(terms, limit=30, subset="random", subset_seed=3).samples
    assert ev.samples != Evaluator(terms, limit=30, subset="random", subset_seed=4).samples
    assert Evaluator(terms, limit=30).samples == {t: list(range(30)) for t in ("mir_test", "srt_test")}
    for idx in ev.samples.values():
        assert len(idx) == 30 and idx == sorted(set(idx)) and idx != list(range(30)) and max(idx) > 100
    # a per-task size changes that task's subset only
    sized = Evaluator(terms, limit=30, limits={"srt_test": 10}, subset="random", subset_seed=3)
    assert len(sized.samples["srt_test"]) == 10 and sized.samples["mir_test"] == ev.samples["mir_test"]
    assert sized.documents == 40

    model_dir = tiny_zoo / "srt"
    ours = ev.score_dir(model_dir)
    cli = lm_eval_cli(f"pretrained={model_dir}", ["mir_test", "srt_test"], tmp_path, "--samples", json.dumps(ev.samples))
    for task in ("mir_test", "srt_test"):
        assert ours.scores[task]["acc"] == cli[task]["acc,none"], task
    # the mean log-probability tells any other 30 documents apart
    assert math.isclose(ours.scores["srt_test"]["logprob"], cli["srt_test"]["logprob,none"], rel_tol=1e-5)
    first = Evaluator(terms, limit=30).score_dir(model_dir)
    assert not math.isclose(first.scores["srt_test"]["logprob"], ours.scores["srt_test"]["logprob"], rel_tol=1e-3)
    with pytest.raises(UserError, match="limits name 'sft_test'"):
        Evaluator(terms, limit=30, limits={"sft_test": 5})


def test_offline_env_is_set_before_datasets_is_imported():
    code = "import evomerge.fitness.evaluator, datasets.config as c, os; print(c.HF_HUB_OFFLINE, os.environ['TOKENIZERS_PARALLELISM'])"
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"}}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "false"]


def test_parse_terms_and_json():
    terms = parse_terms("mir_test, sft_test:logprob,srt_test:acc:2")
    assert terms == [
        FitnessTerm("mir_test", "acc", 1.0),
        FitnessTerm("sft_test", "logprob", 1.0),
        FitnessTerm("srt_test", "acc", 2.0),
    ]
    result = Result(scores={"mir_test": {"acc": 0.5, "logprob": -1.25}}, fitness=0.5)
    assert json.loads(result.to_json()) == {"scores": {"mir_test": {"acc": 0.5, "logprob": -1.25}}, "fitness": 0.5}
    assert Result.from_json(result.to_json()) == result
    assert "mir_test" in result.table() and "0.5000" in result.table()


# ------------------------------------------------------------------ bad input


def test_unknown_task_suggests_a_near_name():
    with pytest.raises(UserError, match="unknown task 'mir_tset'.*did you mean 'mir_test'"):
        Evaluator(parse_terms("mir_tset"))


def test_missing_data_file(tmp_path):
    tasks = shutil.copytree(default_task_path(), tmp_path / "tasks")
    (tasks / "data" / "sft_test.jsonl").unlink()
    with pytest.raises(UserError, match="sft_test.jsonl is missing"):
        Evaluator(parse_terms("sft_test"), task_path=tasks)


def test_model_dir_without_tokenizer(tiny_zoo, evaluator, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_zoo / "base" / f, bare / f)
    with pytest.raises(UserError, match="has no tokenizer"):
        evaluator.score_dir(bare)
    with pytest.raises(UserError, match="no config.json"):
        evaluator.score_dir(tmp_path)


def test_metric_the_task_does_not_produce():
    with pytest.raises(UserError, match=r"does not produce metric 'acc_norm'.*\['acc', 'logprob'\]"):
        Evaluator([FitnessTerm("mir_test", "acc_norm")])


@pytest.mark.parametrize("weight", ["2", "abc", True, float("nan"), float("inf"), None, -1.0, 0])
def test_weight_that_is_not_a_positive_number(weight):
    with pytest.raises(UserError, match="weight"):
        FitnessTerm("mir_test", "acc", weight)


def test_weight_in_cli_string_that_is_not_a_number():
    with pytest.raises(UserError, match="weight 'x' .* is not a number"):
        parse_terms("mir_test:acc:x")
    with pytest.raises(UserError, match="no tasks"):
        parse_terms(" , ")


def test_bad_limit():
    with pytest.raises(UserError, match="limit"):
        Evaluator(parse_terms("mir_test"), limit=0)


def test_eval_on_a_runs_subsets_and_its_bad_inputs(tiny_zoo, tmp_path, capsys):
    from evomerge.cli import main

    subsets = tmp_path / "subsets.json"
    subsets.write_text(json.dumps({"mir_search": [3, 7, 150]}))
    capsys.readouterr()
    assert main(["eval", str(tiny_zoo / "mir"), "--tasks", "mir_search:logprob", "--subsets", str(subsets), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = Evaluator(parse_terms("mir_search:logprob"), samples={"mir_search": [3, 7, 150]}).score_dir(tiny_zoo / "mir")
    assert got["fitness"] == want.fitness
    assert want.fitness != Evaluator(parse_terms("mir_search:logprob"), limit=3).score_dir(tiny_zoo / "mir").fitness
    for args, fragment in ((["--subsets", str(tmp_path / "none.json")], "does not exist"),
                           (["--subsets", str(subsets), "--limit", "3"], "not both")):
        assert main(["eval", str(tiny_zoo / "mir"), "--tasks", "mir_search", *args]) == 2
        assert fragment in capsys.readouterr().err
    subsets.write_text(json.dumps({"mir_search": [5000]}))
    assert main(["eval", str(tiny_zoo / "mir"), "--tasks", "mir_search", "--subsets", str(subsets)]) == 2
    assert "outside its 200" in capsys.readouterr().err
