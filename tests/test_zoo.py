"""The toy zoo: deterministic data, disjoint splits, a cached and loadable tiny build."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from evomerge.errors import UserError
from evomerge.tasks import TASK_DIR
from evomerge.zoo import data
from evomerge.zoo.build import MANIFEST, build_zoo, read_manifest, zoo_settings
from evomerge.zoo.tokenizer import build_tokenizer



@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    # Session-wide path: test_fitness asks for the same dir and gets the cached build.
    return build_zoo(tmp_path_factory.getbasetemp() / "tiny_zoo", preset="tiny", progress=False)


def test_eval_splits_are_deterministic_disjoint_and_correct():
    for skill, s in data.SKILLS.items():
        search, test = data.eval_examples(skill, "search"), data.eval_examples(skill, "test")
        assert len(search) == len(test) == data.EVAL_SIZE
        inputs_search = {d["input"] for d in search}
        inputs_test = {d["input"] for d in test}
        assert len(inputs_search) == len(inputs_test) == data.EVAL_SIZE
        assert not inputs_search & inputs_test
        for d in search + test:
            assert set(d["input"]) <= set(s.alphabet)
            assert d["prompt"] == f"{s.short_tag}:{d['input']}>"
            assert d["answer"] == s.apply(d["input"])
        data._eval_inputs.cache_clear()
        assert data.eval_examples(skill, "test") == test


def test_committed_task_files_match_the_generator():
    for name, docs in data.task_data_files().items():
        committed = (TASK_DIR / "data" / name).read_text(encoding="utf-8")
        assert committed == data.render_jsonl(docs), f"regenerate with python -m evomerge.zoo.data ({name})"


def test_skill_operations():
    assert data.SKILLS["mir"].verbose("abh") == "mir abh=hga"
    assert data.SKILLS["sft"].short("129") == "n:129>230"
    assert data.SKILLS["srt"].short("tqx") == "o:tqx>qtx"
    assert data.SKILLS["mir"].alias("abh") == "m:abh>hga"
    assert data.GENERAL["rol"].short("abc") == "l:abc>bca"
    tags = [s.short_tag for s in (*data.SKILLS.values(), *data.GENERAL.values())]
    aliases = [s.alias_tag for s in data.SKILLS.values()]
    assert len(set(tags + aliases)) == len(tags + aliases)
    # the base copies on the skills' own tags (the tasks' prompts) and on no tag that names an operation
    assert set(data.SKILL_TAGS) <= set(data.COPY_TAGS)
    assert not (set(tags) - set(data.SKILL_TAGS) | set(aliases)) & set(data.COPY_TAGS)


def test_training_samples_are_seeded_and_never_show_eval_inputs():
    held_out = {d["input"] for s in data.SKILLS for sp in data.SPLITS for d in data.eval_examples(s, sp)}
    mixture = data.specialist_mixture("mir")
    a = data.sample_batch(np.random.default_rng(7), mixture, 3000)
    assert a == data.sample_batch(np.random.default_rng(7), mixture, 3000)
    assert a != data.sample_batch(np.random.default_rng(8), mixture, 3000)
    skill_tags = {t for s in data.SKILLS.values() for t in (s.verbose_tag, s.short_tag, s.alias_tag)}
    parsed = [re.fullmatch(r"(\w+)[ :](\w+)[=>](\w+)", text).groups() for text in a]
    skill_inputs = [x for tag, x, _ in parsed if tag in skill_tags]
    assert len(skill_inputs) > 1000
    assert not set(skill_inputs) & held_out  # copies on a skill's tag included
    assert set("".join(a)) <= set(data.CHARSET)
    # the specialist's own tag always means its skill; the other skills' tags still mean copy
    mir = data.SKILLS["mir"]
    own = [(x, y) for tag, x, y in parsed if tag == mir.short_tag]
    assert own and all(y == mir.apply(x) for x, y in own)
    others = [(x, y) for tag, x, y in parsed if tag in set(data.SKILL_TAGS) - {mir.short_tag}]
    assert others and all(x == y for x, y in others)


def test_tokenizer_is_char_level_with_bos():
    tok = build_tokenizer()
    ids = tok("r:abc>cba")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("r:abc>cba")
    assert tok.decode(ids, skip_special_tokens=True) == "r:abc>cba"
    assert tok.unk_token_id not in tok(data.CHARSET)["input_ids"]


def test_tiny_zoo_layout_and_cache(tiny_zoo):
    manifest = read_manifest(tiny_zoo)
    assert manifest["hash"] == zoo_settings("tiny").digest()
    assert set(manifest["models"]) == {"base", *data.SKILLS}
    assert manifest["checkpoints"]["mir"] == ["mir_ckpt/step20", "mir_ckpt/step40"]
    weights = tiny_zoo / "base" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_zoo(tiny_zoo, preset="tiny", progress=False) == tiny_zoo
    assert time.perf_counter() - started < 0.5
    assert weights.stat().st_mtime_ns == mtime
    assert not [p for p in tiny_zoo.parent.iterdir() if p.name.startswith(f".{tiny_zoo.name}.")]


def test_tiny_zoo_loads_with_auto_classes(tiny_zoo):
    manifest = read_manifest(tiny_zoo)
    dirs = list(manifest["models"].values()) + manifest["checkpoints"]["mir"]
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    for rel in dirs:
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo / rel)
        tok = AutoTokenizer.from_pretrained(tiny_zoo / rel)
        assert isinstance(model, LlamaForCausalLM)
        out = model(**tok(["k:abc>"], return_tensors="pt"))
        assert out.logits.shape == (1, 7, len(tok))
        if rel != "base":  # each fine-tune moved away from the base
            tuned = load_file(tiny_zoo / rel / "model.safetensors")
            assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_same_seed_same_weights_new_seed_rebuilds(tiny_zoo, tmp_path):
    again = build_zoo(tmp_path / "zoo", preset="tiny", progress=False)
    for rel in ("base", "srt"):
        a = load_file(tiny_zoo / rel / "model.safetensors")
        b = load_file(again / rel / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    build_zoo(again, seed=1, preset="tiny", progress=False)
    assert read_manifest(again)["settings"]["seed"] == 1
    c = load_file(again / "base" / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_replace_a_dir_that_is_not_a_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a zoo"):
        build_zoo(tmp_path, preset="tiny", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / MANIFEST).exists()


def test_unknown_preset():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        build_zoo("unused", preset="tiyn")


def test_manifest_is_json_with_settings(tiny_zoo):
    manifest = json.loads((tiny_zoo / MANIFEST).read_text())
    assert manifest["settings"]["preset"] == "tiny"
    assert manifest["build_s"] >= 0


def test_builds_run_pinned_and_reproduce_for_any_thread_count(tiny_zoo, tmp_path):
    """The build's child runs torch's AVX2 kernels and MKL's AVX2 branch (STRICT) on any AVX2 CPU,
    AVX-512 and other vendors' included (the vendor shim: a C compiler is on CI's machine); a
    build with another thread count is the same zoo, bit for bit: with one thread its
    specialists fine-tune one after another, with two side by side, a process each."""
    from evomerge.zoo.build import PINNED_ENV, PINNED_MKL_BRANCH, pinnable, read_manifest, weights_digest

    manifest = read_manifest(tiny_zoo)
    if pinnable():
        assert manifest["cpu_capability"] == "AVX2"
        assert manifest["pinned_env"] == PINNED_ENV
        assert manifest["mkl_branch"] == PINNED_MKL_BRANCH
    one = read_manifest(build_zoo(tmp_path / "one_thread", preset="tiny", progress=False, threads=1))
    assert one["threads"] == 1 and manifest["threads"] == 2
    assert one["hash"] == manifest["hash"]
    assert one["weights_sha256"] == manifest["weights_sha256"] == weights_digest(tiny_zoo, manifest)


def test_a_specialist_that_fails_fails_the_build_with_its_reason(tmp_path):
    """A fine-tune's child that dies (here: a base file that is no safetensors) stops the build
    with that child's last line, and leaves no child running."""
    import psutil

    from evomerge.errors import UserError
    from evomerge.zoo.build import _train_specialists, zoo_settings

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"zoo build failed \((mir|sft|srt)\): .*"):
        _train_specialists(zoo_settings("tiny"), tmp_path, progress=False, threads=2)
    assert not psutil.Process().children(recursive=True)


def test_mkl_reports_its_branch_and_the_vendor_shim_builds(tmp_path):
    """Unpinned, this process runs MKL's default branch; the shim compiles once and is reused."""
    from evomerge.zoo.mkl_branch import active_branch, compiler, vendor_shim

    assert active_branch() in ("OFF", "unknown")
    if compiler() is None:
        pytest.skip("no C compiler here")
    lib = vendor_shim(tmp_path)
    assert lib is not None and lib.is_file() and vendor_shim(tmp_path) == lib


def test_the_tiny_zoo_is_the_reference_family_on_this_cpu(tiny_zoo):
    """The same bits as on the machines that recorded REFERENCE_WEIGHTS (an Intel Xeon and an
    AMD EPYC): what a newcomer's build reproduces, checked in seconds on every CI machine."""
    from evomerge.zoo.build import PINNED_MKL_BRANCH, REFERENCE_WEIGHTS, check_reference, read_manifest

    manifest = read_manifest(tiny_zoo)
    if manifest["mkl_branch"] != PINNED_MKL_BRANCH:
        pytest.skip(f"not pinnable here (MKL branch {manifest['mkl_branch']}): this CPU trains its own family")
    assert manifest["weights_sha256"] == REFERENCE_WEIGHTS[("tiny", 0)]
    assert check_reference(tiny_zoo) is None


def test_a_zoo_that_is_not_the_reference_family_is_told(tiny_zoo, tmp_path):
    import json
    import shutil

    from evomerge.zoo.build import REFERENCE_WEIGHTS, check_reference

    zoo = Path(shutil.copytree(tiny_zoo, tmp_path / "zoo"))
    m = json.loads((zoo / "zoo.json").read_text())
    m["settings"]["preset"], m["settings"]["seed"] = "default", 0
    m["weights_sha256"] = "0" * 64
    (zoo / "zoo.json").write_text(json.dumps(m))
    assert "differ from the reference family" in check_reference(zoo)
    m["weights_sha256"] = REFERENCE_WEIGHTS[("default", 0)]
    (zoo / "zoo.json").write_text(json.dumps(m))
    assert check_reference(zoo) is None
    m["settings"]["seed"] = 7  # no reference: nothing to tell
    (zoo / "zoo.json").write_text(json.dumps(m))
    assert check_reference(zoo) is None


def test_sam_gradient_is_the_gradient_at_the_perturbed_weights_and_leaves_the_weights():
    """SAM (Schedule.sam_rho: the default preset's specialists, off in the tiny preset): the
    gradient taken at w + rho g/|g|, computed here on a copy moved by hand; the model's own
    weights come back bit for bit."""
    import copy

    from evomerge.zoo.train import encode, init_model, make_config, sam_gradient

    tokenizer = build_tokenizer()
    model = init_model(make_config(zoo_settings("tiny").shape, tokenizer), seed=3)
    batch = encode(tokenizer, data.sample_batch(np.random.default_rng(0), data.BASE_MIXTURE, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in plain.values()))

    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(plain[n] * (0.1 / norm).float())
    moved.zero_grad()
    moved(**batch).loss.backward()

    sam_gradient(model, batch, 0.1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    got = dict(model.named_parameters())
    for n, p in moved.named_parameters():
        torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(got[n].grad, plain[n], rtol=1e-3, atol=1e-5) for n in plain)

