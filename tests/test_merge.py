"""The merge engine end to end: recipes on tiny real models, the DFS fold, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import UserError
from evomerge.io.model_dir import ModelDir
from evomerge.merge.materialize import plan
from evomerge.merge.to_disk import merge_to_disk, open_sources
from evomerge.recipe import load_recipe, parse_recipe

from conftest import make_model, write_yaml


def weights(d):
    return load_file(d / "model.safetensors")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_linear_merge_matches_formula_and_loads(family, tmp_path, arch):
    f = family[arch]
    recipe = write_yaml(tmp_path / "r.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(f["a"]), "parameters": {"weight": 1.0}},
                   {"model": str(f["b"]), "parameters": {"weight": 3.0}}],
        "dtype": "float32",
    })
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") == 0
    out, a, b = weights(tmp_path / "out"), weights(f["a"]), weights(f["b"])
    assert set(out) == set(a)
    for n in a:
        torch.testing.assert_close(out[n], (a[n] + 3 * b[n]) / 4)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 48)


def test_ties_gradient_and_filters_resolve_per_layer(family, tmp_path):
    f = family["llama"]
    recipe = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(f["base"]),
        "models": [{"model": str(f["a"]), "parameters": {"weight": [0.0, 1.0]}},
                   {"model": str(f["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.0}]}}],
    })
    p = plan(recipe, open_sources(recipe))
    by = {o.name: o for o in p.outputs}
    w = lambda name: [mp["weight"] for mp in by[name].expr.model_params]  # noqa: E731
    assert w("model.layers.0.mlp.up_proj.weight") == [0.0, 0.5]
    assert w("model.layers.1.mlp.up_proj.weight") == [0.5, 0.5]
    assert w("model.layers.2.self_attn.q_proj.weight") == [1.0, 0.0]
    assert w("model.embed_tokens.weight") == [0.0, 0.0]  # t=0 before the blocks
    assert w("lm_head.weight") == [0.0, 0.0]  # t=0 after them too: mergekit's rule (tests/test_mergekit.py)


def test_slices_passthrough_stack_layers(family, tmp_path):
    f = family["llama"]
    recipe = write_yaml(tmp_path / "r.yaml", {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(f["a"]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(f["b"]), "layer_range": [1, 3]}]}],
    })
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") == 0
    out, a, b = weights(tmp_path / "out"), weights(f["a"]), weights(f["b"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"])


def test_sharded_output_with_index_and_recipe_metadata(family, tmp_path):
    f = family["llama"]
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": str(f["a"]), "parameters": {"weight": 1}},
                                                               {"model": str(f["b"]), "parameters": {"weight": 1}}]})
    merge_to_disk(recipe, tmp_path / "out", max_shard_bytes=30_000, progress=False)
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    single = tmp_path / "single"
    merge_to_disk(recipe, single, progress=False)
    a, b = ModelDir(tmp_path / "out"), ModelDir(single)
    for n in b.entries:
        assert torch.equal(a.get(n), b.get(n))
    from safetensors import safe_open

    with safe_open(single / "model.safetensors", "pt") as fh:
        assert "merge_method: linear" in fh.metadata()["evomerge_recipe"]


def test_same_seed_same_tensors_dare(family, tmp_path):
    f = family["qwen2"]
    data = {"merge_method": "dare_ties", "base_model": str(f["base"]),
            "models": [{"model": str(f["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(f["b"]), "parameters": {"weight": 0.4, "density": 0.5}}]}
    recipe = write_yaml(tmp_path / "r.yaml", data)
    for out, seed in (("o1", 1), ("o2", 1), ("o3", 2)):
        assert run_cli("merge", recipe, tmp_path / out, "--seed", seed, "--quiet") == 0
    o1, o2, o3 = (weights(tmp_path / o) for o in ("o1", "o2", "o3"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(o1[n], o2[n]) for n in o1)
    assert not torch.equal(o1[name], o3[name])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_routing_fold_equals_scaled_reference(family, tmp_path, arch):
    """The folded checkpoint's logits equal an unfolded path that scales each slot's input."""
    from transformers import AutoModelForCausalLM

    from scaled_reference import routed_view

    f = family[arch]
    slots = [("a", 0, 1.3), ("b", 1, 0.7), ("a", 2, 1.1), ("b", 1, 0.9), ("base", 2, 1.25)]
    recipe = write_yaml(tmp_path / "r.yaml", {
        "base_model": str(f["base"]),
        "routing": {"slots": [{"source": str(f[s]), "layer": l, "scale": w} for s, l, w in slots]},
    })
    assert run_cli("merge", recipe, tmp_path / "out", "--quiet") == 0
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    models = {k: AutoModelForCausalLM.from_pretrained(f[k], dtype=torch.float32).eval() for k in ("base", "a", "b")}
    arch_info = ModelDir(f["base"]).arch

    def blocks(m):
        node = m
        for part in arch_info.layer_prefix.split("."):
            node = getattr(node, part)
        return node

    types = getattr(models["base"].config, "layer_types", None)
    view = routed_view(models["base"], arch_info.layer_prefix, [(blocks(models[s])[l], w) for s, l, w in slots],
                       arch_info.layer_count_key, [types[l] for _, l, _ in slots] if types else None)
    ids = torch.tensor([[3, 7, 1, 9, 20, 4, 5, 2]])
    with torch.no_grad():
        ref = view(input_ids=ids).logits
        got = folded(input_ids=ids).logits
        plain = models["base"](input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert not torch.allclose(plain, ref, atol=1e-3)  # the path really changed the function
    assert len(blocks(models["base"])) == 3  # the view left the shell untouched


def test_ps_plus_dfs_uses_the_merge_as_a_source(family, tmp_path):
    f = family["llama"]
    recipe = parse_recipe({
        "merge_method": "linear",
        "models": [{"model": str(f["a"]), "parameters": {"weight": 1}}, {"model": str(f["b"]), "parameters": {"weight": 1}}],
        "routing": {"slots": [{"source": "merge", "layer": 0}, {"source": str(f["a"]), "layer": 0, "scale": 2.0},
                              {"source": "merge", "layer": 2}]},
        "dtype": "float32",
    })
    merge_to_disk(recipe, tmp_path / "out", progress=False)
    out, a, b = weights(tmp_path / "out"), weights(f["a"]), weights(f["b"])
    n = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(out[n.format(0)], (a[n.format(0)] + b[n.format(0)]) / 2)
    torch.testing.assert_close(out[n.format(1)], a[n.format(0)] / 2)
    torch.testing.assert_close(out[n.format(2)], (a[n.format(2)] + b[n.format(2)]) / 4)
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


def test_dry_run_prints_plan_and_writes_nothing(family, tmp_path, capsys):
    f = family["llama"]
    recipe = write_yaml(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(f["base"]),
                                              "models": [{"model": str(f["a"]), "parameters": {"weight": 1, "density": 0.3}}]})
    assert run_cli("merge", recipe, tmp_path / "out", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "peak memory estimate" in text and "tensors" in text
    assert not (tmp_path / "out").exists()


# --- bad input: one line, exit code 2, nothing written -------------------------------------------

def _expect_refusal(tmp_path, capsys, recipe_data, fragment, out_name="out"):
    recipe = write_yaml(tmp_path / "bad.yaml", recipe_data)
    before = set(tmp_path.iterdir())
    capsys.readouterr()  # drop what building the fixtures printed
    assert run_cli("merge", recipe, tmp_path / out_name, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert set(tmp_path.iterdir()) == before  # nothing half-written, no temp dirs


def test_refuses_mismatched_architectures(family, tmp_path, capsys):
    _expect_refusal(tmp_path, capsys, {"merge_method": "linear", "models": [
        {"model": str(family["llama"]["a"]), "parameters": {"weight": 1}},
        {"model": str(family["gpt2"]["a"]), "parameters": {"weight": 1}}]}, "architectures differ")


def test_refuses_mismatched_shapes_and_vocab(tmp_path, capsys):
    from transformers import LlamaConfig

    a = make_model(tmp_path / "m_a", "llama")
    b = make_model(tmp_path / "m_b", "llama", seed=3)
    cfg = json.loads((b / "config.json").read_text())
    # a model with a wider MLP: same names, other shapes
    from transformers import AutoModelForCausalLM
    wide = AutoModelForCausalLM.from_config(LlamaConfig(**{**cfg, "intermediate_size": 96}))
    wide.save_pretrained(tmp_path / "m_wide")
    (tmp_path / "m_wide" / "tokenizer.json").write_bytes((a / "tokenizer.json").read_bytes())
    _expect_refusal(tmp_path, capsys, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(tmp_path / "m_wide"), "parameters": {"weight": 1}}]},
        "shape mismatch")
    big = AutoModelForCausalLM.from_config(LlamaConfig(**{**cfg, "vocab_size": 50}))
    big.save_pretrained(tmp_path / "m_vocab")
    _expect_refusal(tmp_path, capsys, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(tmp_path / "m_vocab"), "parameters": {"weight": 1}}]},
        "vocabulary sizes differ")


def test_refuses_corrupt_and_missing_sources(family, tmp_path, capsys):
    bad = make_model(tmp_path / "m_bad", "llama")
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[:-64])
    _expect_refusal(tmp_path, capsys, {"merge_method": "linear", "models": [
        {"model": str(family["llama"]["a"]), "parameters": {"weight": 1}}, {"model": str(bad), "parameters": {"weight": 1}}]},
        "truncated")
    _expect_refusal(tmp_path, capsys, {"merge_method": "linear", "models": [
        {"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1}}]}, "does not exist")


def test_refuses_nan_source_and_leaves_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    a = make_model(tmp_path / "m_a", "llama")
    b = make_model(tmp_path / "m_nan", "llama", seed=5)
    t = load_file(b / "model.safetensors")
    t["model.norm.weight"][3] = float("nan")  # the last tensor written: the failure comes half-way
    save_file(t, b / "model.safetensors", metadata={"format": "pt"})
    _expect_refusal(tmp_path, capsys, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}]}, "NaN or Inf")


@pytest.mark.parametrize("data_fn, fragment", [
    (lambda f: {"merge_method": "ties", "base_model": str(f["base"]),
                "models": [{"model": str(f["a"]), "parameters": {"weight": 1, "density": 1.5}}]}, "density"),
    (lambda f: {"merge_method": "ties", "base_model": str(f["base"]),
                "models": [{"model": str(f["a"]), "parameters": {"weight": 1, "density": 0}}]}, "density"),
    (lambda f: {"merge_method": "tie", "base_model": str(f["base"]),
                "models": [{"model": str(f["a"]), "parameters": {"weight": 1}}]}, "did you mean 'ties'"),
    (lambda f: {"merge_method": "passthrough",
                "slices": [{"sources": [{"model": str(f["a"]), "layer_range": [0, 7]}]}]}, "goes past its 3 layers"),
    (lambda f: {"merge_method": "linear", "models": [{"model": str(f["a"])}]}, "weight"),
    (lambda f: {"base_model": str(f["base"]), "routing": {"slots": [{"source": str(f["a"]), "layer": 9}]}}, "does not exist"),
    (lambda f: {"base_model": str(f["base"]), "routing": {"slots": [{"source": str(f["a"]), "layer": 0, "scale": -1}]}}, "must be > 0"),
    (lambda f: {"merge_method": "linear", "modelz": []}, "modelz"),
])
def test_refuses_bad_recipes(family, tmp_path, capsys, data_fn, fragment):
    _expect_refusal(tmp_path, capsys, data_fn(family["llama"]), fragment)


def test_refuses_nonempty_out_dir_without_force(family, tmp_path, capsys):
    f = family["llama"]
    data = {"merge_method": "linear", "models": [{"model": str(f["a"]), "parameters": {"weight": 1}}]}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("keep me")
    _expect_refusal(tmp_path, capsys, data, "--force")
    assert (tmp_path / "out" / "precious").read_text() == "keep me"
    recipe = write_yaml(tmp_path / "ok.yaml", data)
    assert run_cli("merge", recipe, tmp_path / "out", "--force", "--quiet") == 0
    assert not (tmp_path / "out" / "precious").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_refuses_post_norm_routing(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(vocab_size=48, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m_opt")
    _expect_refusal(tmp_path, capsys, {"base_model": str(tmp_path / "m_opt"),
                                       "routing": {"slots": [{"source": str(tmp_path / "m_opt"), "layer": 0}]}}, "pre-norm")


def test_load_recipe_errors(tmp_path):
    (tmp_path / "x.yaml").write_text("merge_method: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "x.yaml")
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_misspelt_parameter_refused(family, tmp_path, capsys):
    f = family["llama"]
    _expect_refusal(tmp_path, capsys, {"merge_method": "ties", "base_model": str(f["base"]), "models": [
        {"model": str(f["a"]), "parameters": {"weight": 1, "densty": 0.5}}]}, "did you mean 'density'")
