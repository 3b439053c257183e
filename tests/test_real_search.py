"""On the real SmolLM2-135M checkpoint: the search scores what it exports, routed recipes included.

SmolLM2's embeddings have std ~0.04 and its RMSNorm epsilon is 1e-5: scaling a slot's input
and folding that scale into the weights are different functions here (12 % of the logits'
maximum apart at the issue's scales), so these tests fail for a worker that scores anything
but the fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge.to_disk import merge_to_disk
from evomerge.recipe import parse_recipe
from evomerge.space.config import load_search_config
from evomerge.workers.candidate import CandidateWorker

from conftest import write_yaml

FITNESS = {"tasks": [{"task": "en_facts", "metric": "logprob"}, {"task": "en_arith", "metric": "logprob"}],
           "limit": 6, "batch_size": 8}


def _config(fam: dict, path: Path, space: str, **over) -> Path:
    data = {"base_model": str(fam["base"]), "models": [str(fam["ft_all"]), str(fam["ft_mlp"])],
            "fitness": FITNESS, "optimizer": {"popsize": 4, "max_evals": 8, "seed": 0, "sigma0": 0.3},
            "workers": {"count": 0}}
    if space in ("ps", "ps_dfs"):
        data["ps"] = {"method": "ties", "tune": {"weight": [0.0, 1.0], "density": [0.3, 1.0]}, "layer_granularity": 15}
    if space == "dfs":
        data["dfs"] = {"sources": [str(fam["base"]), str(fam["ft_all"])], "repeats": 1, "scale_bounds": [0.6, 1.4]}
    if space == "ps_dfs":
        data["dfs"] = {"sources": ["merge", str(fam["ft_all"])], "repeats": 1, "scale_bounds": [0.6, 1.4]}
    data.update(over)
    return write_yaml(path, data)


@pytest.mark.parametrize("space, dtype, workers", [
    ("ps", None, 0), ("dfs", None, 0), ("ps_dfs", None, 2), ("ps_dfs", "float32", 0),
], ids=["ps-bf16", "dfs-bf16", "ps_dfs-bf16-ray", "ps_dfs-fp32"])
def test_search_fitness_equals_eval_of_export(smollm2_family, tmp_path, capsys, space, dtype, workers):
    over = {"workers": {"count": workers}} | ({"dtype": dtype} if dtype else {})
    cfg = _config(smollm2_family, tmp_path / "c.yaml", space, **over)
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(e["error"] is None for e in hist)
    best = max(hist, key=lambda e: (e["fitness"], -e["eval_id"]))
    assert main(["export", str(run), "--model", str(tmp_path / "model")]) == 0
    written = load_file(tmp_path / "model" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.float32 if dtype else torch.bfloat16}
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "model"), "--tasks", "en_facts:logprob,en_arith:logprob", "--subsets", str(run / "subsets.json"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["fitness"] == pytest.approx(best["fitness"], rel=1e-5, abs=0)
    if space != "ps":
        slots = yaml.safe_load((run / "best.yaml").read_text())["routing"]["slots"]
        assert any(abs(s.get("scale", 1.0) - 1.0) > 0.05 for s in slots)  # real scales were folded


def test_routed_candidate_is_the_exported_model(smollm2_family, tmp_path):
    """The issue's path (scales 0.5 / 0.6 / 1.4 / 0.7 on its first slots): the worker's live model
    holds the exported tensors and gives the exported model's logits, to the bit."""
    from transformers import AutoModelForCausalLM

    fam = smollm2_family
    scales = [0.5, 0.6, 1.4, 0.7] + [1.0] * 26
    slots = [{"source": str(fam["ft_all"] if i % 3 == 1 else fam["base"]), "layer": i, "scale": w} for i, w in enumerate(scales)]
    recipe = parse_recipe({"base_model": str(fam["base"]), "routing": {"slots": slots}})
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    cfg = load_search_config(_config(fam, tmp_path / "c.yaml", "dfs"))
    worker = CandidateWorker(cfg.model_dump(mode="json"))
    assert worker.ping() is None
    live = worker.materialize(recipe)
    state = live.state_dict()
    for name, t in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(state[name], t.float()), name
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = worker.tokenizer("The capital of France is Paris, and two plus two is four.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(live(input_ids=ids).logits, exported(input_ids=ids).logits)
