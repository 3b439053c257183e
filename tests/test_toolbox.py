"""SWA, soups and the zoo's toolbox family, on the tiny zoo: real models, real lm-eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from evomerge.averaging.swa import natural_key, select_checkpoints
from evomerge.errors import UserError
from evomerge.zoo.toolbox import PRESETS, build_toolbox, read_toolbox


@pytest.fixture(scope="session")
def tiny_toolbox(tiny_zoo, tmp_path_factory):
    return build_toolbox(tmp_path_factory.mktemp("toolbox") / "toolbox", tiny_zoo, progress=False)


def evomerge(*args: str):
    return run_cli(*args)


def test_toolbox_family_layout_and_cache(tiny_toolbox, tiny_zoo):
    m = read_toolbox(tiny_toolbox)
    settings = PRESETS["tiny"]
    assert m["models"] == settings.model_dirs() and m["cpu_capability"] in ("AVX2", m["cpu_capability"])
    assert m["zoo_hash"] == json.loads((tiny_zoo / "zoo.json").read_text())["hash"]
    for rel in m["models"]:
        assert (tiny_toolbox / rel / "tokenizer.json").is_file()
    a, b = (load_file(tiny_toolbox / "pair" / n / "model.safetensors") for n in "ab")
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    # the pair starts from its own initializations, not from the zoo's base
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    stamp = (tiny_toolbox / "toolbox.json").stat().st_mtime_ns
    assert build_toolbox(tiny_toolbox, tiny_zoo, progress=False) == tiny_toolbox
    assert (tiny_toolbox / "toolbox.json").stat().st_mtime_ns == stamp  # cached: nothing rebuilt


def test_toolbox_needs_a_built_zoo(tmp_path):
    with pytest.raises(UserError, match="evomerge zoo build"):
        build_toolbox(tmp_path / "out", tmp_path / "nozoo", progress=False)


def test_checkpoint_selection(tiny_toolbox, tmp_path):
    assert sorted(["step1000", "step200"], key=lambda s: natural_key(Path(s))) == ["step200", "step1000"]
    pattern = str(tiny_toolbox / "swa" / "step*")
    every = select_checkpoints([pattern])
    assert [p.name for p in every] == ["step0020", "step0030", "step0040"]
    assert [p.name for p in select_checkpoints([pattern], last=2)] == ["step0030", "step0040"]
    assert [p.name for p in select_checkpoints([pattern], stride=2)] == ["step0020", "step0040"]
    with pytest.raises(UserError, match="at least 2"):
        select_checkpoints([pattern], last=1)
    with pytest.raises(UserError, match="no checkpoint directories match"):
        select_checkpoints([str(tmp_path / "nope*")])
    with pytest.raises(UserError, match="listed twice"):
        select_checkpoints([str(every[0]), str(every[0])])


def test_swa_is_the_mean_of_the_checkpoints(tiny_toolbox, tmp_path):
    out = tmp_path / "swa"
    done = evomerge("swa", str(tiny_toolbox / "swa" / "step*"), str(out), "--last", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    got = load_file(out / "model.safetensors")
    ckpts = [load_file(tiny_toolbox / "swa" / s / "model.safetensors") for s in ("step0030", "step0040")]
    for name, t in got.items():
        want = (ckpts[0][name] + ckpts[1][name]) / 2
        torch.testing.assert_close(t, want, rtol=0, atol=1e-7)
    assert not torch.equal(got["model.norm.weight"], ckpts[1]["model.norm.weight"])


def test_swa_bad_input_is_one_line_and_writes_nothing(tiny_toolbox, tmp_path):
    out = tmp_path / "never"
    for args in ([str(tmp_path / "missing"), str(tiny_toolbox / "swa" / "step0020")],
                 [str(tiny_toolbox / "swa" / "step*"), "--stride", "0"]):
        done = evomerge("swa", *args, str(out))
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not out.exists()


def _broken_copy(src: Path, dst: Path, scale: float) -> Path:
    """An ingredient that hurts a soup: the same model with its weights far from the basin."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    noisy = {n: t + scale * torch.randn(t.shape, generator=gen) if t.ndim == 2 else t for n, t in tensors.items()}
    save_file(noisy, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_greedy_soup_drops_a_harmful_ingredient_and_scores_what_it_writes(tiny_zoo, tiny_toolbox, tmp_path):
    good = [tiny_zoo / "mir", *(tiny_toolbox / "soup" / i.name for i in PRESETS["tiny"].ingredients)]
    bad = _broken_copy(tiny_zoo / "mir", tmp_path / "broken", 0.5)
    out = tmp_path / "soup"
    done = evomerge("soup", *map(str, good + [bad]), str(out), "--greedy", "--tasks", "mir_search:logprob",
                    "--limit", "24", "--quiet")
    assert done.returncode == 0, done.stderr
    log = json.loads((out / "evomerge_soup.json").read_text())
    steps = {Path(s["ingredient"]).name: s for s in log["steps"]}
    assert steps["broken"]["kept"] is False
    assert steps["broken"]["alone"] < min(s["alone"] for n, s in steps.items() if n != "broken")
    # the soup's recorded held-out score is the score of the model written
    scored = evomerge("eval", str(out), "--tasks", "mir_search:logprob", "--limit", "24", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["fitness"] == pytest.approx(log["fitness"], rel=1e-6)
    kept = [Path(s["ingredient"]).name for s in log["steps"] if s["kept"]]
    recipe = (out / "evomerge_recipe.yaml").read_text()
    assert all(name in recipe for name in kept) and "broken" not in recipe


def test_uniform_soup_keeps_every_ingredient(tiny_zoo, tiny_toolbox, tmp_path):
    models = [tiny_zoo / "mir", tiny_toolbox / "soup" / "mir_lr0.05"]
    out = tmp_path / "uniform"
    done = evomerge("soup", *map(str, models), str(out), "--tasks", "mir_search:logprob", "--limit", "8", "--quiet")
    assert done.returncode == 0, done.stderr
    got = load_file(out / "model.safetensors")
    a, b = (load_file(m / "model.safetensors") for m in models)
    torch.testing.assert_close(got["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2, rtol=0, atol=1e-7)


def test_soup_refuses_one_model_and_repeats(tiny_zoo, tmp_path):
    for models in ([tiny_zoo / "mir"], [tiny_zoo / "mir", tiny_zoo / "mir"]):
        done = evomerge("soup", *map(str, models), str(tmp_path / "x"), "--tasks", "mir_search")
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "x").exists()
