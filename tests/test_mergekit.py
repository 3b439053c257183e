"""Parity with mergekit 0.1.5 itself, not with a description of it.

Each case is one recipe, merged by the real mergekit (its own venv, tests/mergekit_env.py;
all cases in one ``mergekit-multi`` process, whose merges are ``mergekit-yaml``'s
``run_merge``, and one case through ``mergekit-yaml`` itself to show the two agree) and by
``evomerge merge``; every tensor is compared: the same names, shapes and dtypes, then:

- float32: equal (``torch.equal``, so +0 == -0). evomerge's kernels now do mergekit's
  float32 operations in mergekit's order (linear.py, slerp.py, task_vector.py), so there
  is no reassociation left to allow for, and any tolerance would hide the next real
  difference: the post-layer gradient bug moved lm_head by 0.065, a one-ulp reordering
  moves a tensor of std 0.2 by 3e-8.
- bfloat16 computation (``dtype: bfloat16``, or bf16 models and no dtype): mergekit runs
  the task-vector arithmetic in bf16, evomerge in float32 with one rounding at the end;
  ``test_bf16_*`` states the difference and asserts its bound.
- DARE below density 1: mergekit draws from torch's RNG, evomerge from a counter-based
  hash, so only the rules can match (``test_dare_*``).
- magnitude ties at a trim threshold: ``test_trim_ties_*``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_yaml
from evomerge.cli import main as evomerge_cli
from evomerge.merge.to_disk import merge_to_disk
from evomerge.recipe import parse_recipe
from mergekit_cases import (EXACT, TIED, AnyPath, all_recipes, bf16_bounded_cases, bf16_exact_cases, build_models,
                            chat_template_cases, dare_cases, named_chat_template_cases, exact_cases, lora_cases, tied_case, tied_name, tokenizer_cases,
                            trim_tie_cases, vocab_cases, modules_cases)
from mergekit_env import run_mergekit, run_mergekit_many

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: one ulp at 1
U = 2.0**-8  # bf16's unit roundoff: one rounding moves a value by at most U of it


@pytest.fixture(scope="module")
def models(family, tmp_path_factory) -> dict[str, Path]:
    """The parity family by key (mergekit_cases.build_models)."""
    return build_models(family, tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def mergekit_out(models, mergekit_yaml, tmp_path_factory) -> dict[str, Path]:
    """Every case's mergekit output, from one mergekit process."""
    return run_mergekit_many(all_recipes(models), tmp_path_factory.mktemp("mergekit"), exe=mergekit_yaml)


# --- comparing ---------------------------------------------------------------------------


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def evomerge(recipe: dict, out: Path) -> Path:
    merge_to_disk(parse_recipe(recipe), out, progress=False)
    return out


def same_layout(mk: dict, ev: dict) -> None:
    assert sorted(ev) == sorted(mk), f"only mergekit: {sorted(set(mk) - set(ev))}, only evomerge: {sorted(set(ev) - set(mk))}"
    for n in mk:
        assert (ev[n].shape, ev[n].dtype) == (mk[n].shape, mk[n].dtype), n


def assert_equal_tensors(mk_dir: Path, ev_dir: Path) -> None:
    mk, ev = weights(mk_dir), weights(ev_dir)
    same_layout(mk, ev)
    for n in mk:
        if not torch.equal(ev[n], mk[n]):
            d = (ev[n].float() - mk[n].float()).abs()
            ulps = float(d.max()) / (torch.finfo(mk[n].dtype).eps * float(mk[n].float().abs().max()))
            pytest.fail(f"{n}: {int((d > 0).sum())} of {d.numel()} entries differ, by up to {float(d.max()):.3g} "
                        f"({ulps:.2f} ulps of the tensor's largest magnitude)")


def config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


# --- float32: equal -----------------------------------------------------------------------


@pytest.mark.parametrize("case", EXACT)
def test_fp32_equals_mergekit(case, models, mergekit_out, tmp_path):
    arch, name = case.split("-", 1)
    recipe = exact_cases(models, arch)[name]
    out = evomerge(recipe, tmp_path / "evo")
    assert_equal_tensors(mergekit_out[case], out)
    mk_cfg, ev_cfg = config(mergekit_out[case]), config(out)
    for key in ("num_hidden_layers", "n_layer", "tie_word_embeddings", "dtype"):
        assert ev_cfg.get(key) == mk_cfg.get(key), key


def test_mergekit_yaml_gives_what_the_batch_gives(models, mergekit_out, mergekit_yaml, tmp_path):
    """The batch runner is mergekit-yaml's merge: one case through the CLI itself."""
    recipe = exact_cases(models, "llama")["task_arithmetic_gradient"]
    out = run_mergekit(write_yaml(tmp_path / "r.yaml", recipe), tmp_path / "mk", exe=mergekit_yaml)
    assert_equal_tensors(mergekit_out["llama-task_arithmetic_gradient"], out)
    assert_equal_tensors(out, evomerge(recipe, tmp_path / "evo"))


# --- tied embeddings -----------------------------------------------------------------------


@pytest.mark.parametrize("case", TIED, ids=[tied_name(*c) for c in TIED])
def test_tied_embeddings_match_mergekit_or_are_refused(case, models, mergekit_out, tmp_path, capsys):
    """Every tied/untied combination of base and sources: mergekit's tensors, lm_head
    presence and tie_word_embeddings; or, for a tied base with untied sources, a one-line
    refusal, since mergekit writes the merged head under a config that still says tied."""
    arch, base_tied, sources_tied, method = case
    mk_dir = mergekit_out[tied_name(*case)]
    recipe = tied_case(models, *case)
    if base_tied and not sources_tied:
        assert "lm_head.weight" in weights(mk_dir) and config(mk_dir)["tie_word_embeddings"] is True  # why we refuse
        path = write_yaml(tmp_path / "r.yaml", recipe)
        capsys.readouterr()
        assert evomerge_cli(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "ties its output head" in err, err
        assert not (tmp_path / "out").exists()
        return
    out = evomerge(recipe, tmp_path / "evo")
    assert_equal_tensors(mk_dir, out)
    assert ("lm_head.weight" in weights(out)) == (not (base_tied and sources_tied))
    assert config(out)["tie_word_embeddings"] == config(mk_dir)["tie_word_embeddings"] == base_tied


# --- bfloat16 ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(bf16_exact_cases(AnyPath())))
def test_bf16_equals_mergekit_where_both_round_once(case, models, mergekit_out, tmp_path):
    """Linear and slerp compute in float32 in mergekit too and round the result to the
    recipe's dtype once; inputs are read in that dtype (float32 models rounded to bf16
    first) and the result passes through it on the way to out_dtype, as in mergekit."""
    out = evomerge(bf16_exact_cases(models)[case], tmp_path / "evo")
    assert_equal_tensors(mergekit_out[case], out)
    assert config(out).get("dtype") == config(mergekit_out[case]).get("dtype")


@pytest.mark.parametrize("case", list(bf16_bounded_cases(AnyPath())))
def test_bf16_task_vectors_within_mergekit_rounding(case, models, mergekit_out, tmp_path):
    """mergekit runs the task-vector methods in the compute dtype: given bf16 (``dtype:
    bfloat16``, or bf16 models and no dtype) it rounds each delta, each weight (0.7 is
    0.69921875 there), each product, the sum, the quotient and the lambda product to bf16;
    evomerge computes in float32 and rounds once. Per entry, with T = |lambda| sum_i
    |w_i| |delta_i| / D (D: 1, or the smallest weight when TIES normalizes), those six
    roundings move mergekit's value by at most ~6 U T (U = 2**-8), and the two results
    may then round to neighbouring bf16 values: so |mergekit - evomerge| <= eps * |value|
    + 8 U T. Exempt are the entries where a discrete choice may flip under that rounding:
    a TIES sign election with |sum w delta| <= 2**-5 sum |w delta|, and (trims) a |delta_i|
    within 2**-6 of its tensor's threshold, where mergekit ranks bf16-rounded magnitudes
    (ties among them broken by torch.argsort's order). Those stay under 3 % of the model."""
    recipe, keys, ws, lam, divisor, densities, consensus = bf16_bounded_cases(models)[case]
    out = evomerge(recipe, tmp_path / "evo")
    mk, ev = weights(mergekit_out[case]), weights(out)
    same_layout(mk, ev)
    base, *inputs = (weights(models[k]) for k in keys)
    worst, flipped, total = 0.0, 0, 0
    for n in mk:
        b = base[n].float()
        deltas = [x[n].float() - b for x in inputs]
        terms = [abs(w) * d.abs() for w, d in zip(ws, deltas)]
        scale = abs(lam) * sum(terms) / divisor
        got, want = ev[n].float(), mk[n].float()
        bound = BF16_EPS * torch.maximum(got.abs(), want.abs()) + 8 * U * scale
        outside = (got - want).abs() > bound
        exempt = torch.zeros_like(outside)
        trimmed = list(deltas)
        for i, (d, density) in enumerate(zip(deltas, densities or ())):
            if density < 1:
                magnitude = d.abs().flatten()
                threshold = magnitude.sort(descending=True).values[max(1, int(density * magnitude.numel())) - 1]
                exempt |= (d.abs() - threshold).abs() <= 2**-6 * threshold
                trimmed[i] = d * (d.abs() >= threshold)
        if consensus:  # the election sees the trimmed deltas
            weighted = [w * d for w, d in zip(ws, trimmed)]
            exempt |= sum(weighted).abs() <= 2**-5 * sum(x.abs() for x in weighted)
        assert not (outside & ~exempt).any(), f"{n}: {int((outside & ~exempt).sum())} entries beyond the bf16 bound"
        flipped, total = flipped + int(outside.sum()), total + outside.numel()
        if not exempt.all():  # a bf16 norm whose deltas mostly round to 0 has threshold 0: all exempt
            worst = max(worst, float(((got - want).abs() / bound)[~exempt].max()))
    print(f"{case}: largest |mergekit - evomerge| off the choices {worst:.2f} of the bound; "
          f"{flipped} of {total} entries with a flipped choice")
    assert flipped <= 0.03 * total


# --- DARE below density 1 --------------------------------------------------------------------


@pytest.mark.parametrize("case", list(dare_cases(AnyPath())))
def test_dare_rules_match_mergekit(case, models, mergekit_out, tmp_path):
    """DARE keeps each entry with probability `density`; mergekit draws the mask from
    torch's global RNG, evomerge from a counter-based hash of (seed, tensor, model), so the
    masks differ and only the rules are compared, for each tool's output on its own terms:
    the kept fraction of every tensor is Binomial(n, density) (within 5 sigma), a dropped
    entry is the base exactly, and a kept one is base + weight * s * delta with s the
    L1 rule mergekit applies by default (sum |delta| / sum of the kept |delta|), or 1
    with rescale: false; checked to float32 rounding (4 ulps of the entry's terms)."""
    recipe, weight, density, l1 = dare_cases(models)[case]
    ev_dir = evomerge(recipe, tmp_path / "evo")
    base, source = weights(models["llama/base"]), weights(models["llama/a"])
    for tool, d in (("mergekit", mergekit_out[case]), ("evomerge", ev_dir)):
        out = weights(d)
        assert sorted(out) == sorted(base)
        for n, merged in out.items():
            b, delta = base[n], source[n] - base[n]
            kept = merged != b
            count, size = int(kept.sum()), kept.numel()
            sigma = math.sqrt(size * density * (1 - density))
            assert abs(count - density * size) <= 5 * sigma, f"{tool} {n}: kept {count} of {size}"
            s = float(delta.abs().sum() / delta[kept].abs().sum()) if l1 else 1.0
            want = weight * s * delta[kept]
            slack = 4 * torch.finfo(torch.float32).eps * (b[kept].abs() + want.abs())
            assert ((merged[kept] - b[kept]) - want).abs().le(slack).all(), f"{tool} {n}: kept entries not rescaled by {s:.4f}"


@pytest.mark.parametrize("case", [c for c in dare_cases(AnyPath()) if c.startswith("della")])
def test_della_keeps_larger_changes_more_often_like_mergekit(case, models, mergekit_out, tmp_path):
    """DELLA's keep probability rises with an entry's magnitude rank in its row, from
    density - epsilon to density + epsilon; over all tensors, the entries in the lowest and
    the highest third of their rows are kept at the rates that rule gives (within 5 sigma),
    by mergekit and by evomerge alike."""
    recipe, _, density, _ = dare_cases(models)[case]
    epsilon = recipe["parameters"].get("epsilon", 0.15)
    ev_dir = evomerge(recipe, tmp_path / "evo")
    base, source = weights(models["llama/base"]), weights(models["llama/a"])
    for tool, d in (("mergekit", mergekit_out[case]), ("evomerge", ev_dir)):
        low = high = n_low = n_high = 0
        p_low = p_high = 0.0
        for n, merged in weights(d).items():
            delta = source[n] - base[n]
            rows = delta if delta.dim() >= 2 else delta[None]
            kept = (merged != base[n]).reshape(rows.shape)
            width = rows.shape[1]
            if width < 3:
                continue
            rank = rows.abs().argsort(dim=1).argsort(dim=1).float()
            p = density - epsilon + 2 * epsilon * rank / (width - 1)
            bottom, top = rank < width / 3, rank >= 2 * width / 3
            low, high = low + int(kept[bottom].sum()), high + int(kept[top].sum())
            n_low, n_high = n_low + int(bottom.sum()), n_high + int(top.sum())
            p_low, p_high = p_low + float(p[bottom].sum()), p_high + float(p[top].sum())
        for got, want, count in ((low, p_low, n_low), (high, p_high, n_high)):
            sigma = math.sqrt(count * 0.25)
            assert abs(got - want) <= 5 * sigma, f"{tool}: kept {got} of {count}, the rule expects {want:.0f}"
        assert high / n_high - low / n_low > epsilon, f"{tool}: larger changes not kept more often"


# --- LoRA sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(lora_cases(AnyPath())))
def test_lora_sources_equal_mergekit(case, models, mergekit_out, tmp_path):
    """MODEL+ADAPTER: the adapter merged in tensor by tensor gives mergekit's tensors (which
    merges it with peft's merge_and_unload first), LoRA and rsLoRA scaling alike."""
    assert_equal_tensors(mergekit_out[case], evomerge(lora_cases(models)[case], tmp_path / "evo"))


# --- tokenizer choices -------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(tokenizer_cases(AnyPath())))
def test_tokenizer_choice_over_one_vocabulary_equals_mergekit(case, models, mergekit_out, tmp_path):
    """tokenizer_source: union and the tokenizer: section (union, base, a model,
    pad_to_multiple_of, a slice's residual_weight) over models sharing one vocabulary: the
    same tensors and the same vocabulary as mergekit."""
    from transformers import AutoTokenizer

    ev_dir = evomerge(tokenizer_cases(models)[case], tmp_path / "evo")
    assert_equal_tensors(mergekit_out[case], ev_dir)
    assert AutoTokenizer.from_pretrained(ev_dir).get_vocab() == AutoTokenizer.from_pretrained(mergekit_out[case]).get_vocab()


@pytest.mark.parametrize("case", list(vocab_cases(AnyPath())))
def test_differing_vocabularies_equal_mergekit(case, models, mergekit_out, tmp_path):
    """Fine-tunes that added tokens, under every tokenizer choice (union, base, a model,
    tokens: overrides, padding, tied heads, GPT-2): the same output vocabulary as mergekit
    and, token by token, the same embedding and head rows; every other tensor equal."""
    from transformers import AutoTokenizer

    from evomerge.io.vocab import is_vocab_tensor

    mk_dir, ev_dir = mergekit_out[case], evomerge(vocab_cases(models)[case], tmp_path / "evo")
    mk_tok, ev_tok = (AutoTokenizer.from_pretrained(d) for d in (mk_dir, ev_dir))
    mk_vocab, ev_vocab = mk_tok.get_vocab(), ev_tok.get_vocab()
    assert sorted(ev_vocab) == sorted(mk_vocab)
    special = lambda tok: {a.content: a.special for a in tok.added_tokens_decoder.values()}  # noqa: E731
    assert special(ev_tok) == special(mk_tok)
    assert config(ev_dir)["vocab_size"] == config(mk_dir)["vocab_size"]
    tokens = sorted(mk_vocab)
    ev_ids, mk_ids = ([v[t] for t in tokens] for v in (ev_vocab, mk_vocab))
    mk, ev = weights(mk_dir), weights(ev_dir)
    same_layout(mk, ev)
    assert any(is_vocab_tensor(n) for n in mk)
    for n in mk:
        if is_vocab_tensor(n):
            assert torch.equal(ev[n][ev_ids], mk[n][mk_ids]), n
            if ev_ids == mk_ids:  # the padding rows' mean then reduces the same rows in the same order
                assert torch.equal(ev[n][len(tokens):], mk[n][len(tokens):]), n
        else:
            assert torch.equal(ev[n], mk[n]), n


def test_differing_vocabularies_without_a_tokenizer_choice_are_refused(models, tmp_path, capsys):
    """Rows of two vocabularies cannot be merged as they are: one line saying how to re-index
    them, and nothing written."""
    recipe = {"merge_method": "linear", "models": [{"model": str(models["llama/b"]), "parameters": {"weight": 0.5}},
                                                   {"model": str(models["llama/a_added"]), "parameters": {"weight": 0.5}}]}
    assert evomerge_cli(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vocabulary sizes differ" in err and "tokenizer_source: union" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokens, says", [
    ({"<x>": {"source": "nowhere"}}, "not one of the recipe's models"),
    ({"<x>": {"source": {"kind": "model_token", "model": "B", "token": "<absent>"}}}, "has no token '<absent>'"),
    ({"<x>": {"source": {"kind": "model_token", "model": "B", "token_id": 999}}}, "outside"),
    ({"<|im_end|>": {"source": "B"}}, "whose vocabulary lacks it"),
])
def test_bad_token_sources_are_refused_in_one_line(models, tmp_path, capsys, tokens, says):
    b = str(models["llama/b"])
    tokens = {t: {**cfg, "source": b if cfg["source"] == "B" else
                  (dict(cfg["source"], model=b) if isinstance(cfg["source"], dict) else cfg["source"])}
              for t, cfg in tokens.items()}
    recipe = {"merge_method": "linear", "tokenizer": {"source": "union", "tokens": tokens},
              "models": [{"model": b, "parameters": {"weight": 0.5}},
                         {"model": str(models["llama/a_added"]), "parameters": {"weight": 0.5}}]}
    assert evomerge_cli(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# --- modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(modules_cases(AnyPath())))
def test_modules_form_equals_mergekit(case, models, mergekit_out, tmp_path):
    assert_equal_tensors(mergekit_out[case], evomerge(modules_cases(models)[case], tmp_path / "evo"))


@pytest.mark.parametrize("modules, says", [
    ({"text_decoder": {"models": []}, "vision_tower": {"models": []}}, "multi-module models"),
    ({"default": {"models": [{"model": "A"}], "parameters": {"normalize": True}}}, "set in modules.default and in"),
])
def test_modules_beyond_one_decoder_are_refused(models, tmp_path, capsys, modules, says):
    a = str(models["llama/a"])
    modules = {k: {**v, "models": [{"model": a}] if "models" in v else []} for k, v in modules.items()}
    recipe = {"merge_method": "linear", "parameters": {"normalize": False}, "modules": modules}
    assert evomerge_cli(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and not (tmp_path / "out").exists()


# --- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(chat_template_cases(AnyPath())))
def test_chat_template_like_mergekit(case, models, mergekit_out, tmp_path):
    """`chat_template: auto` takes the models' most common template, a template's text is
    written as given: the output's tokenizer has the template mergekit's has, and the tensors
    are mergekit's."""
    from transformers import AutoTokenizer

    recipe, want = chat_template_cases(models)[case]
    ev_dir = evomerge(recipe, tmp_path / "evo")
    for tool, d in (("mergekit", mergekit_out[case]), ("evomerge", ev_dir)):
        assert AutoTokenizer.from_pretrained(d).chat_template == want, tool
    assert_equal_tensors(mergekit_out[case], ev_dir)


@pytest.mark.parametrize("case", list(named_chat_template_cases(AnyPath())))
def test_named_chat_templates_render_as_mergekits(case, models, mergekit_out, tmp_path):
    """chat_template: chatml | llama3 | alpaca | mistral | exaone: evomerge's own template of
    that format renders every conversation (generation prompt or not, refusals included) as
    the one mergekit writes. exaone: mergekit's file is indented for another renderer and puts
    those spaces and line breaks into prompts; evomerge's gives the same turns and markers without them."""
    import re

    from transformers import AutoTokenizer

    from mergekit_cases import CONVERSATIONS

    ev_dir = evomerge(named_chat_template_cases(models)[case], tmp_path / "evo")
    toks = [AutoTokenizer.from_pretrained(d) for d in (mergekit_out[case], ev_dir)]
    assert toks[0].chat_template and toks[1].chat_template

    def render(tok, conv, prompt):
        tok.bos_token, tok.eos_token = "<s>", "</s>"
        try:
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # noqa: BLE001 - a format refusing a conversation is part of it
            return f"refused: {e}"
        if case.endswith("exaone"):  # the turns and markers; mergekit's line breaks and indentation are its file's
            return re.sub(r"\s*\n\s*", "", text).strip()
        return text

    for conv in CONVERSATIONS:
        if case.endswith("exaone") and any("\n" in m["content"] or m["content"].startswith(" ") for m in conv):
            continue  # the normalization above would change the content itself
        for prompt in (False, True):
            assert render(toks[1], conv, prompt) == render(toks[0], conv, prompt), (conv, prompt)
    assert_equal_tensors(mergekit_out[case], ev_dir)


def test_an_unknown_chat_template_name_is_refused(models, tmp_path, capsys):
    recipe = dict(chat_template_cases(models)["chat_template_auto"][0], chat_template="vicuna")
    assert evomerge_cli(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), str(tmp_path / "out")]) == 2
    assert "chatml" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --- magnitude ties at a trim threshold ------------------------------------------------------


@pytest.mark.parametrize("case", list(trim_tie_cases(AnyPath())))
def test_trim_ties_at_the_threshold(case, models, mergekit_out, tmp_path):
    """bf16 fine-tunes have few distinct |delta| values, so a trim threshold is often shared
    by many entries. mergekit keeps exactly k of them, picked by torch.argsort's unstable
    order (reproducible only by sorting the whole tensor the same way); evomerge, which never
    sorts, keeps every entry at the threshold. Everything else is equal: the merges differ
    exactly on the tied entries mergekit dropped."""
    recipe, density, gamma = trim_tie_cases(models)[case]
    mk, ev = weights(mergekit_out[case]), weights(evomerge(recipe, tmp_path / "evo"))
    same_layout(mk, ev)
    base, source = weights(models["real/base"]), weights(models["real/ft0"])
    extra = 0
    for n in mk:
        b = base[n].float()
        magnitude = (source[n].float() - b).abs()
        ranked = magnitude.flatten().sort().values  # ascending
        size = ranked.numel()
        if gamma is None:
            k = max(1, int(density * size))
            edges = [ranked[size - k]]
            band = magnitude >= edges[0]
        else:
            k, top = int(density * size), int(gamma * size)
            bottom = max(0, size - k - top)
            edges = [ranked[bottom], ranked[bottom + k - 1]]
            band = (magnitude >= edges[0]) & (magnitude <= edges[1])
        # a zero delta leaves the base whether kept or not: count the kept nonzero ones
        zeros = int((magnitude == 0).sum())
        start = size - k if gamma is None else bottom
        mk_kept, ev_kept = mk[n].float() != b, ev[n].float() != b
        assert int(mk_kept.sum()) == k - max(0, min(k, zeros - start)), n
        assert torch.equal(ev_kept, band & (magnitude > 0)), n
        differ = mk[n] != ev[n]
        at_edge = sum(magnitude == e for e in edges).bool()
        assert not (differ & ~at_edge).any(), f"{n}: entries off the threshold differ"
        assert torch.equal(differ, ev_kept & ~mk_kept), n
        extra += int(differ.sum())
    assert extra > 0  # the family does produce ties, so the rule above is exercised


# --- refusals --------------------------------------------------------------------------------


def test_a_model_twice_in_one_slice_is_refused_like_mergekit(models, mergekit_yaml, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(models["llama/a"]), "parameters": {"weight": 0.5}},
        {"model": str(models["llama/a"]), "parameters": {"weight": 0.5}}]})
    with pytest.raises(RuntimeError, match="Duplicate merge inputs"):
        run_mergekit(recipe, tmp_path / "mk", exe=mergekit_yaml)
    capsys.readouterr()
    assert evomerge_cli(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "listed twice" in err, err


# --- the real checkpoint ------------------------------------------------------------------


def smollm2_recipes(fam: dict) -> dict[str, dict]:
    """mergekit recipes on SmolLM2 (bf16 on disk, tied head, GQA, 30 layers). ``dtype: float32``
    reads the bf16 weights exactly and keeps float32 out: both tools must agree bit for bit."""
    base, a, b = (str(fam[k]) for k in ("base", "ft_all", "ft_mlp"))
    fp32 = {"dtype": "float32"}
    return {
        "linear_gradient": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": [1.0, 0.2, 0.6]}}, {"model": b, "parameters": {"weight": 0.5}}], **fp32},
        "task_arithmetic_filters": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [{"filter": "self_attn", "value": 0.8}, {"value": 0.3}]}},
            {"model": b, "parameters": {"weight": [0.2, 1.0]}}], "parameters": {"lambda": 1.2}, **fp32},
        # density 1: sign election and the disjoint mean, no trim (trimming: the test below)
        "ties_elect": {"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [1.0, 0.4], "density": 1.0}},
            {"model": b, "parameters": {"weight": 0.6, "density": 1.0}}], **fp32},
        "slerp_gradient": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}],
                           "parameters": {"t": [0.0, 0.5, 1.0]}, **fp32},
        "passthrough_stack": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": base, "layer_range": [0, 20]}]},
            {"sources": [{"model": a, "layer_range": [10, 30]}]}], **fp32},
        "linear_bf16": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]},
    }


def test_smollm2_equals_mergekit(smollm2_family, mergekit_yaml, tmp_path):
    """Every tensor of merges of the real checkpoint, against mergekit's, equal."""
    recipes = smollm2_recipes(smollm2_family)
    mk = run_mergekit_many(recipes, tmp_path / "mk", exe=mergekit_yaml)
    for name, recipe in recipes.items():
        out = evomerge(recipe, tmp_path / name)
        assert_equal_tensors(mk[name], out)
        assert config(out)["tie_word_embeddings"] == config(mk[name])["tie_word_embeddings"] is True, name
        assert config(out)["num_hidden_layers"] == config(mk[name])["num_hidden_layers"], name
        (tmp_path / name / "model.safetensors").unlink()  # 0.5 GB a merge: keep the disk free


def test_smollm2_ties_trim_differs_only_on_entries_tied_at_the_threshold(smollm2_family, mergekit_yaml, tmp_path):
    """On real bf16 fine-tunes a TIES trim threshold is shared by many entries (|delta| takes few
    values). mergekit keeps exactly k, the first k of an unstable torch.argsort (on a GPU it
    sorts in another dtype and order, so its choice is not even one rule); evomerge keeps every
    tied entry. The merges are equal everywhere else."""
    base, a = smollm2_family["base"], smollm2_family["ft_all"]
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.4}}]}
    mk = weights(run_mergekit_many({"ties": recipe}, tmp_path / "mk", exe=mergekit_yaml)["ties"])
    ev = weights(evomerge(recipe, tmp_path / "evo"))
    same_layout(mk, ev)
    b, src = weights(base), weights(a)
    tied = 0
    for n in mk:
        delta = (src[n].float() - b[n].float()).abs().flatten()
        k = max(1, int(0.4 * delta.numel()))
        threshold = delta.kthvalue(delta.numel() - k + 1).values
        differ = (mk[n] != ev[n]).flatten()
        assert (delta[differ] == threshold).all(), f"{n}: entries off the threshold differ"
        assert torch.equal(ev[n].flatten()[differ], src[n].float().flatten()[differ]), n  # evomerge kept them
        assert int((mk[n].flatten() != b[n].float().flatten()).sum()) <= k, n  # mergekit kept at most k
        tied += int(differ.sum())
    assert tied > 0
