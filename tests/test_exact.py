"""The model a search scores is the model its export writes: same tensors, same fitness.

On a family at realistic scale (embeddings of std 0.02, RMSNorm epsilon 1e-6), where a
norm's epsilon is not negligible and the scaled-input path and its fold are different
functions: the worker must score the fold, since that is what export writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge.to_disk import merge_to_disk
from evomerge.recipe import parse_recipe
from evomerge.workers.candidate import CandidateWorker

from conftest import search_config, zoo_skills

EMBED_STD = 0.02
EPS = 1e-6
# a path whose cumulative scales move away from 1 and back (the 0.5 / 0.6 / 1.4 / 0.7)
SCALES = (0.5, 0.6, 1.4, 0.7, 1.3)


def realistic(zoo: Path, out: Path, dtype: torch.dtype) -> Path:
    """The tiny zoo with its embeddings rescaled to std 0.02 and epsilon 1e-6, stored in ``dtype``."""
    from transformers import AutoModelForCausalLM

    base = load_file(zoo / "base" / "model.safetensors")["model.embed_tokens.weight"]
    factor = EMBED_STD / float(base.std())
    out.mkdir(parents=True)
    for name in ["base", *zoo_skills(zoo)]:
        model = AutoModelForCausalLM.from_pretrained(zoo / name, dtype=torch.float32)
        model.config.rms_norm_eps = EPS
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(factor)
        model.to(dtype).save_pretrained(out / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(zoo / name / f, out / name / f)
    shutil.copy(zoo / "zoo.json", out / "zoo.json")
    return out


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def real_zoo(request, tiny_zoo, tmp_path_factory):
    return realistic(tiny_zoo, tmp_path_factory.mktemp("realistic") / "zoo", request.param)


def routed_recipe(zoo: Path, ps: bool) -> dict:
    a, b = zoo_skills(zoo)[:2]
    slots = [("merge" if ps else str(zoo / a), 0), (str(zoo / b), 1), (str(zoo / a), 1), (str(zoo / b), 0),
             ("merge" if ps else str(zoo / "base"), 1)]
    data = {"base_model": str(zoo / "base"),
            "routing": {"slots": [{"source": s, "layer": layer, "scale": w} for (s, layer), w in zip(slots, SCALES)]}}
    if ps:
        data |= {"merge_method": "task_arithmetic",
                 "models": [{"model": str(zoo / a), "parameters": {"weight": 0.7}},
                            {"model": str(zoo / b), "parameters": {"weight": [0.3, 0.9]}}]}
    return data


def worker_for(zoo: Path, tmp_path: Path) -> CandidateWorker:
    cfg = search_config(zoo, tmp_path / "c.yaml")
    from evomerge.space.config import load_search_config

    return CandidateWorker(load_search_config(cfg).model_dump(mode="json"))


@pytest.mark.parametrize("ps", [False, True], ids=["dfs", "ps_dfs"])
def test_worker_scores_the_exported_tensors_and_logits(real_zoo, tmp_path, ps):
    """Every tensor of the live candidate equals the exported file's, and so do the logits."""
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe(routed_recipe(real_zoo, ps))
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    worker = worker_for(real_zoo, tmp_path)
    live = worker.materialize(recipe)
    state = live.state_dict()
    assert set(written) <= set(state)
    for name, t in written.items():
        assert torch.equal(state[name], t.to(state[name].dtype)), name
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.tensor([[3, 7, 1, 9, 20, 4, 5, 2, 11, 30]])
    with torch.no_grad():
        assert torch.equal(live(input_ids=ids).logits, exported(input_ids=ids).logits)
    # the path is not a no-op, and the resident sources were left untouched
    assert len(worker.sources[str(real_zoo / "base")].blocks()) == 2


def test_fold_differs_from_scaled_inputs_at_realistic_scale(real_zoo, tmp_path):
    """Why the worker must score the fold: with std-0.02 embeddings and eps 1e-6 the
    scaled-input path is another function (if this ever stops failing to agree, the
    fixture no longer tests anything)."""
    from transformers import AutoModelForCausalLM

    from scaled_reference import routed_view

    recipe = parse_recipe(routed_recipe(real_zoo, ps=False))
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    models: dict = {}
    layers = []
    for slot in recipe.routing.slots:
        m = models.setdefault(slot.source, AutoModelForCausalLM.from_pretrained(slot.source, dtype=torch.float32).eval())
        layers.append((m.model.layers[slot.layer], slot.scale))
    shell = AutoModelForCausalLM.from_pretrained(recipe.base_model, dtype=torch.float32).eval()
    view = routed_view(shell, "model.layers", layers, "num_hidden_layers")
    ids = torch.tensor([[3, 7, 1, 9, 20, 4, 5, 2, 11, 30]])
    with torch.no_grad():
        scaled = view(input_ids=ids).logits
        got = folded(input_ids=ids).logits
    rel = float((scaled - got).abs().max() / got.abs().max())
    assert rel > 1e-3, rel


def _eval_json(model: Path, tasks: str, limit: int | Path, capsys) -> dict:
    """`evomerge eval --json`: on the first ``limit`` documents, or on a run's subsets.json."""
    capsys.readouterr()
    pick = ["--subsets", str(limit)] if isinstance(limit, Path) else ["--limit", str(limit)]
    assert main(["eval", str(model), "--tasks", tasks, *pick, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("space", ["ps", "dfs", "ps_dfs"])
def test_search_fitness_equals_eval_of_its_export(real_zoo, tmp_path, capsys, space):
    """history.jsonl's best fitness (a continuous one) equals `evomerge eval` of `export --model`."""
    a, b = zoo_skills(real_zoo)[:2]
    over = {"optimizer": {"popsize": 4, "max_evals": 8, "seed": 1, "sigma0": 0.3}}
    if space != "ps":
        over["dfs"] = {"repeats": 1, "scale_bounds": [0.5, 1.5]}
    if space == "dfs":
        over["ps"] = None
    cfg = search_config(real_zoo, tmp_path / "c.yaml", **over)
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--quiet"]) == 0
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    best = max((e for e in hist if e["fitness"] is not None), key=lambda e: (e["fitness"], -e["eval_id"]))
    assert main(["export", str(run), "--model", str(tmp_path / "model")]) == 0
    got = _eval_json(tmp_path / "model", f"{a}_search:logprob,{b}_search:logprob", run / "subsets.json", capsys)
    assert got["fitness"] == pytest.approx(best["fitness"], rel=1e-5, abs=0)
    if space != "ps":
        slots = yaml.safe_load((run / "best.yaml").read_text())["routing"]["slots"]
        assert any(s.get("scale", 1.0) != 1.0 for s in slots)  # the scales were really folded


def test_decoded_paths_keep_the_cumulative_scale_within_bounds(tiny_zoo, tmp_path):
    """Scales up to 2 over a long path would compound far past what folds safely; the codec
    holds every c_k in [1/max_cumulative_scale, max_cumulative_scale] and the plan accepts it."""
    import numpy as np

    from evomerge.merge.materialize import plan
    from evomerge.merge.to_disk import open_sources
    from evomerge.run.search import build_space
    from evomerge.space.config import load_search_config

    cfg = load_search_config(search_config(tiny_zoo, tmp_path / "c.yaml", ps=None,
                                           dfs={"repeats": 3, "scale_bounds": [0.5, 2.0], "max_cumulative_scale": 3.0}))
    space = build_space(cfg)
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(20):
        x = rng.random(space.dim)
        x[space.dfs_offset:space.dfs_offset + len(space.slots)] = 0.9  # every slot on: the longest path
        recipe = space.decode(x)
        c, worst = 1.0, 1.0
        for slot in recipe.routing.slots:
            c *= slot.scale
            worst = max(worst, c, 1 / c)
        seen.append(worst)
        plan(recipe, open_sources(recipe))
    assert max(seen) <= 3.0 * (1 + 1e-4) and max(seen) > 2.5  # the bound was reached, and held


def test_a_recipe_whose_scales_compound_too_far_is_refused(tiny_zoo, tmp_path, capsys):
    from conftest import write_yaml

    base = str(tiny_zoo / "base")
    recipe = write_yaml(tmp_path / "r.yaml", {"base_model": base, "routing": {"slots": [
        {"source": base, "layer": 0, "scale": 5.0}, {"source": base, "layer": 1, "scale": 4.0}]}})
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "routing slot 1" in err[0] and "16" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["della", "della_linear", "sce", "nuslerp", "multislerp", "arcee_fusion", "ram",
                                    "ramplus_tl"])
def test_newer_methods_search_what_they_export(real_zoo, tmp_path, method):
    """Each newer method as ``ps.method``: a genome decodes to a recipe whose live candidate
    has exactly the tensors `evomerge merge` writes for it. arcee_fusion and ram have
    nothing to tune, so they take part in a search with a data-flow space."""
    from evomerge.run.search import build_space
    from evomerge.space.config import load_search_config

    skills = zoo_skills(real_zoo)[: 1 if method == "arcee_fusion" else 2]
    cfg = search_config(real_zoo, tmp_path / "c.yaml", models=[str(real_zoo / s) for s in skills],
                        ps={"method": method, "layer_granularity": 1},
                        **({"dfs": {"repeats": 1}} if method in ("arcee_fusion", "ram") else {}))
    space = build_space(load_search_config(cfg))
    recipe = space.decode(np.random.default_rng(0).random(space.dim))
    assert recipe.merge_method == method
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    worker = CandidateWorker(load_search_config(cfg).model_dump(mode="json"))
    state = worker.materialize(recipe).state_dict()
    for name, t in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(state[name], t.to(state[name].dtype)), name


def test_lora_sources_search_what_they_export(real_zoo, tmp_path):
    """A LoRA source (MODEL+ADAPTER) in a parameter-space search: the worker holds the model
    once and the adapter's factors, and the candidate it scores has exactly the tensors
    `evomerge merge` writes (fp32 and bf16 models; the adapter is merged in per tensor)."""
    from mergekit_cases import _lora_adapter

    from evomerge.run.search import build_space
    from evomerge.space.config import load_search_config
    from evomerge.workers.resident import ResidentLora

    adapter = _lora_adapter(real_zoo / "base", tmp_path / "adapter", rank=4, alpha=8, rslora=False)
    skill = zoo_skills(real_zoo)[0]
    cfg = search_config(real_zoo, tmp_path / "c.yaml", models=[f"{real_zoo / 'base'}+{adapter}", str(real_zoo / skill)],
                        ps={"method": "task_arithmetic", "layer_granularity": 1})
    space = build_space(load_search_config(cfg))
    recipe = space.decode(np.random.default_rng(0).random(space.dim))
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    worker = CandidateWorker(load_search_config(cfg).model_dump(mode="json"))
    lora = next(s for s in worker.sources.values() if isinstance(s, ResidentLora))
    assert lora.base is worker.sources[str(real_zoo / "base")]  # the model is resident once
    state = worker.materialize(recipe).state_dict()
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in written.items():
        assert torch.equal(state[name], t.to(state[name].dtype)), name
    base = load_file(real_zoo / "base" / "model.safetensors")
    assert any(not torch.equal(written[n], base[n]) for n in lora.adapter.targets())


def test_a_search_over_a_lora_source_runs_and_refuses_routing_it(tiny_zoo, tmp_path, capsys):
    from mergekit_cases import _lora_adapter

    from evomerge.cli import main as cli

    adapter = _lora_adapter(tiny_zoo / "base", tmp_path / "adapter", rank=2, alpha=2, rslora=True)
    models = [f"{tiny_zoo / 'base'}+{adapter}", str(tiny_zoo / zoo_skills(tiny_zoo)[0])]
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", models=models, optimizer={"popsize": 4, "max_evals": 4, "seed": 0})
    assert cli(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "results.md").is_file()
    routed = search_config(tiny_zoo, tmp_path / "d.yaml", models=models, dfs={"repeats": 1})
    capsys.readouterr()
    assert cli(["search", str(routed), "--run-dir", str(tmp_path / "run2"), "--quiet"]) == 2
    assert "cannot be a data-flow source" in capsys.readouterr().err


def test_added_tokens_search_what_they_export(real_zoo, tmp_path):
    """A specialist that added two special tokens (two more embedding and head rows) in a
    search with a tokenizer: section: the worker re-indexes every source's rows once, its
    tokenizer is the one export writes, and its candidate has exactly export's tensors."""
    from mergekit_cases import CHAT_TOKENS, _with_added_tokens
    from transformers import AutoTokenizer

    from evomerge.run.search import build_space
    from evomerge.space.config import load_search_config

    a, b = zoo_skills(real_zoo)[:2]
    added = _with_added_tokens(real_zoo / a, tmp_path / f"{a}_added", CHAT_TOKENS, seed=3)
    # b adds one of a's tokens too: its row is the average of the two, in the stored dtype
    b_added = _with_added_tokens(real_zoo / b, tmp_path / f"{b}_added", CHAT_TOKENS[:1], seed=4)
    ntok = len(AutoTokenizer.from_pretrained(added))
    pad = next(k for k in (64, 48, 40) if ntok % k)  # padding rows: each model's mean row
    cfg = search_config(real_zoo, tmp_path / "c.yaml", models=[str(added), str(b_added)],
                        ps={"method": "ties", "layer_granularity": 1}, tokenizer={"source": "union", "pad_to_multiple_of": pad})
    space = build_space(load_search_config(cfg))
    recipe = space.decode(np.random.default_rng(0).random(space.dim))
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "union"
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    worker = CandidateWorker(load_search_config(cfg).model_dump(mode="json"))
    assert worker.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    for _ in range(2):  # the second candidate reads the kept re-indexed rows
        state = worker.materialize(recipe).state_dict()
        written = load_file(tmp_path / "out" / "model.safetensors")
        for name, t in written.items():
            assert torch.equal(state[name], t.to(state[name].dtype)), name
    emb = next(n for n in written if n.endswith("embed_tokens.weight"))
    assert len(worker.tokenizer) == ntok and written[emb].shape[0] == -(-ntok // pad) * pad > ntok
    assert len(worker.vocab.cache) >= 1


def test_a_search_over_added_tokens_runs_and_needs_a_tokenizer_section(tiny_zoo, tmp_path, capsys):
    from mergekit_cases import CHAT_TOKENS, _with_added_tokens

    from evomerge.cli import main as cli

    a, b = zoo_skills(tiny_zoo)[:2]
    added = _with_added_tokens(tiny_zoo / a, tmp_path / f"{a}_added", CHAT_TOKENS, seed=3)
    models = [str(added), str(tiny_zoo / b)]
    bare = search_config(tiny_zoo, tmp_path / "bare.yaml", models=models)
    capsys.readouterr()
    assert cli(["search", str(bare), "--run-dir", str(tmp_path / "run0"), "--quiet"]) == 2
    assert "tokenizer: section" in capsys.readouterr().err
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", models=models, tokenizer={"source": "union"},
                        optimizer={"popsize": 4, "max_evals": 4, "seed": 0})
    assert cli(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert cli(["export", str(tmp_path / "run"), "--out", str(tmp_path / "best.yaml")]) == 0
    assert "tokenizer:" in (tmp_path / "best.yaml").read_text()


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_sorted_magnitudes_give_the_tensors_export_writes(real_zoo, tmp_path, method):
    """A worker sorts each ranked |source - base| once and reads every later candidate's
    thresholds off it: each candidate still has exactly the tensors `evomerge merge` writes,
    with the copies for all tensors, for some (a budget that holds a few) or for none."""
    from evomerge.run.search import build_space
    from evomerge.space.config import load_search_config
    from evomerge.workers.magnitudes import SortedMagnitudes

    cfg = search_config(real_zoo, tmp_path / "c.yaml", ps={"method": method, "layer_granularity": 1,
                                                         "tune": {"weight": [0.2, 1.0], "density": [0.1, 0.9]}})
    space = build_space(load_search_config(cfg))
    worker = CandidateWorker(load_search_config(cfg).model_dump(mode="json"))
    rng = np.random.default_rng(0)
    recipes = [space.decode(rng.random(space.dim)) for _ in range(2)]
    written = []
    for k, recipe in enumerate(recipes):
        merge_to_disk(recipe, tmp_path / f"out{k}", progress=False)
        written.append(load_file(tmp_path / f"out{k}" / "model.safetensors"))
    one_tensor = max(t.numel() for t in worker.candidate_tensors.values()) * 4
    for budget in (worker.magnitudes.budget, 3 * one_tensor, 0):
        worker.magnitudes = SortedMagnitudes(budget)
        for k, recipe in enumerate(recipes):
            state = worker.materialize(recipe).state_dict()
            for name, t in written[k].items():
                assert torch.equal(state[name], t.to(state[name].dtype)), (budget, k, name)
            if k == 0:
                filled = worker.magnitudes.used
        assert worker.magnitudes.used == filled <= budget  # the second candidate sorted nothing new
        assert (filled > 0) == (budget > 0)
