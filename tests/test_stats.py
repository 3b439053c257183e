"""Calibration data, Gram and Fisher statistics, their cache, and the two merges that use them.

Real tiny models: the zoo's architecture and tokenizer at the tiny preset's shape (built
untrained here, which is quick: statistics need the layout, not the skills) and the Llama,
Qwen2 and GPT-2 fixtures' models; the zoo's own lm-eval tasks as calibration data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, make_model
from evomerge.errors import UserError
from evomerge.merge import fisher as fisher_merge
from evomerge.merge import regmean
from evomerge.stats import CalibrationSpec, fisher_stats, gram_stats
from evomerge.stats.cache import stats_path
from evomerge.stats.calibration import batches, load_texts
from evomerge.stats.fisher import compute_fisher
from evomerge.stats.gram import GramFile, compute_grams, linear_types


def zoo_shaped(path: Path, seed: int = 0) -> Path:
    from evomerge.zoo.build import zoo_settings
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import init_model, make_config

    tok = build_tokenizer()
    init_model(make_config(zoo_settings("tiny").shape, tok), seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models' matmuls are too small to split: two threads only contend, and on a busy
    machine each call then waits for the other's core."""
    from evomerge.zoo.train import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_zoo")
    return zoo_shaped(root / "a", 0), zoo_shaped(root / "b", 1)


@pytest.fixture(scope="module")
def archs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_archs")
    return {arch: make_model(root / arch, arch, seed=3 + i) for i, arch in enumerate(("llama", "qwen2", "gpt2"))}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def word_texts(n: int, seed: int = 0) -> list[str]:
    """Texts for the fixtures' word-level tokenizer (tokens t0..t47), of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{int(i)}" for i in torch.randint(2, VOCAB, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g))
            for _ in range(n)]


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_batches(n: int, batch_size: int, max_len: int, seed: int = 0) -> list[dict]:
    """Right-padded id batches, lengths 1..max_len. Made by hand: AutoTokenizer reads the Qwen2
    fixture's word-level tokenizer as a Qwen2Tokenizer, which encodes its words to nothing."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        lens = torch.randint(1, max_len + 1, (min(batch_size, n - start),), generator=g)
        ids = torch.randint(0, VOCAB, (len(lens), int(lens.max())), generator=g)
        mask = (torch.arange(int(lens.max()))[None] < lens[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


# ----------------------------------------------------------------------------- kernels


def test_fisher_merge_of_identical_models_is_that_model():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, 5, generator=g)
    fishers = [torch.rand(6, 5, generator=g) * 10 ** float(e) for e in (-8, 0, 3)]
    merged = fisher_merge.merge([theta] * 3, fishers, [0.2, 0.5, 0.3])
    torch.testing.assert_close(merged, theta, rtol=1e-6, atol=1e-6)


def test_fisher_merge_weighs_by_floored_fisher():
    a, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0])
    fa, fb = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 0.0])
    merged = fisher_merge.merge([a, b], [fa, fb], [1.0, 3.0], floor=1e-6)
    # element 0: (1*1*1 + 3*1*3) / (1 + 3); element 1: a's zero Fisher floored; element 2: both floored = weighted average
    want = torch.tensor([10 / 4, (1e-6 * 1 + 6 * 3) / (1e-6 + 6), (1 + 9) / 4])
    torch.testing.assert_close(merged, want)
    with pytest.raises(UserError):
        fisher_merge.merge([a, b], [fa, fb], [0.0, 0.0])


def test_regmean_of_identical_models_is_that_model():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 5, generator=g)
    grams = [(x.T @ x) for x in (torch.randn(20, 5, generator=g) for _ in range(3))]
    for alpha in (1.0, 0.9, 0.0):
        torch.testing.assert_close(regmean.merge([w] * 3, grams, alpha=alpha), w, rtol=1e-5, atol=1e-5)


def test_regmean_solves_the_regression_on_every_models_inputs():
    g = torch.Generator().manual_seed(2)
    n_in, n_out = 6, 4
    xs = [torch.randn(n, n_in, generator=g, dtype=torch.float64) * s for n, s in ((30, 1.0), (12, 3.0), (50, 0.5))]
    ws = [torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in xs]
    merged = regmean.merge([w.float() for w in ws], [x.T @ x for x in xs], alpha=1.0)
    # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 is least squares on the stacked data
    target = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(torch.cat(xs), target).solution.T
    torch.testing.assert_close(merged.double(), want, rtol=1e-5, atol=1e-5)
    # GPT-2's Conv1D stores W^T: the same solution, transposed
    conv = regmean.merge([w.T.float() for w in ws], [x.T @ x for x in xs], alpha=1.0, conv1d=True)
    torch.testing.assert_close(conv, merged.T)


def test_regmean_scales_off_diagonals_and_coefficients():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(10, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    alpha, coeffs = 0.7, [0.25, 0.75]
    scaled = [c * (alpha * gm + (1 - alpha) * torch.diag(torch.diag(gm))) for gm, c in zip(grams, coeffs)]
    want = torch.linalg.solve(sum(scaled), sum(s @ w.T for s, w in zip(scaled, ws))).T
    got = regmean.merge([w.float() for w in ws], grams, alpha=alpha, coefficients=coeffs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # alpha = 0: every input feature is weighted by its own activity, per column
    diag = [torch.diag(gm) for gm in grams]
    per_col = (ws[0] * diag[0] + ws[1] * diag[1]) / (diag[0] + diag[1])
    torch.testing.assert_close(regmean.merge([w.float() for w in ws], grams, alpha=0.0).double(), per_col, rtol=1e-5, atol=1e-5)


def test_regmean_input_no_model_saw_gets_the_average():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(20, 5, generator=g) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0  # feature 2 is never active
    ws = [torch.randn(3, 5, generator=g) for _ in range(2)]
    merged = regmean.merge(ws, [x.T @ x for x in xs], alpha=1.0)
    torch.testing.assert_close(merged[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2)
    assert torch.isfinite(merged).all()


# ----------------------------------------------------------------------------- Grams


def reference_grams(model, data) -> dict[str, tuple[torch.Tensor, int]]:
    """A plain full forward per batch, a hook on every linear, float64 sums over non-padding tokens."""
    out: dict[str, list] = {}
    mask_box = [None]
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, linear_types()):
            def hook(_m, args, name=name):
                rows = args[0][mask_box[0].bool()].double()
                entry = out.setdefault(f"{name}.weight", [0, 0])
                entry[0] = entry[0] + rows.T @ rows
                entry[1] += rows.shape[0]
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in data:
            mask_box[0] = b["attention_mask"]
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    return {k: (v[0], v[1]) for k, v in out.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_streamed_grams_equal_a_full_forward_with_hooks(archs, arch, tmp_path):
    model = load(archs[arch])
    data = random_batches(21, batch_size=8, max_len=12, seed=5)
    assert compute_grams(model, data, tmp_path / "g.safetensors") == "streamed"
    got = GramFile(tmp_path / "g.safetensors")
    want = reference_grams(model, data)
    assert sorted(got.names()) == sorted(want)
    tokens = int(sum(b["attention_mask"].sum() for b in data))
    for name, (gram, count) in want.items():
        assert got.count(name) == count == tokens
        torch.testing.assert_close(got.gram(name).double(), gram, rtol=1e-5, atol=1e-5 * float(gram.abs().max()))
    if arch == "gpt2":
        assert got.conv1d == {n for n in want if n != "lm_head.weight"}  # Conv1D everywhere but the head
        assert got.tied == {"lm_head.weight": "transformer.wte.weight"}
    else:
        layer = "model.layers.1"
        assert got.key(f"{layer}.self_attn.k_proj.weight") == got.key(f"{layer}.self_attn.v_proj.weight") == f"{layer}.self_attn.q_proj.weight"
        assert got.key(f"{layer}.mlp.up_proj.weight") == f"{layer}.mlp.gate_proj.weight"
        assert got.key(f"{layer}.self_attn.o_proj.weight") == f"{layer}.self_attn.o_proj.weight"
        assert len(got.keys()) == 4 * 3 + 1  # per layer: q/k/v, o, gate/up, down; and the head
    # the fallback (full forwards, every Gram in memory) gives the same Grams
    assert compute_grams(model, data, tmp_path / "f.safetensors", stream=False) == "full"
    full = GramFile(tmp_path / "f.safetensors")
    for name in want:
        torch.testing.assert_close(full.gram(name), got.gram(name))


# ----------------------------------------------------------------------------- Fisher


def hand_fisher(model, seqs) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for seq in seqs:
        model.zero_grad()
        logp = model(input_ids=seq[None]).logits[0, :-1].log_softmax(-1)
        logp.gather(1, seq[1:, None]).sum().backward()
        for n, p in params.items():
            acc[n] += p.grad ** 2
    return {n: a / len(seqs) for n, a in acc.items()}


def test_fisher_is_the_mean_of_per_example_squared_gradients(archs):
    from transformers import AutoTokenizer

    model = load(archs["llama"])
    tok = AutoTokenizer.from_pretrained(archs["llama"])
    texts = word_texts(10, seed=1)
    data = batches(tok, texts, CalibrationSpec(task="unused", max_length=12, batch_size=4, min_examples=1))
    got, examples = compute_fisher(model, data, labels="data")
    assert examples == 10
    seqs = [ids[m.bool()] for b in data for ids, m in zip(b["input_ids"], b["attention_mask"])]
    want = hand_fisher(model, seqs)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-10)
    # The shortcut (square of the batch's summed gradient, over the example count) is another quantity.
    model.zero_grad()
    sum(model(input_ids=s[None]).logits[0, :-1].log_softmax(-1).gather(1, s[1:, None]).sum() for s in seqs).backward()
    for name, p in model.named_parameters():
        if name.endswith("q_proj.weight"):
            shortcut = p.grad ** 2 / len(seqs)
            assert (shortcut - got[name]).abs().sum() > 0.1 * got[name].abs().sum()
    # sampled labels: reproducible by seed, another estimate than the empirical one
    s0, _ = compute_fisher(model, data, labels="sampled", seed=0)
    s0b, _ = compute_fisher(model, data, labels="sampled", seed=0)
    s1, _ = compute_fisher(model, data, labels="sampled", seed=1)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(s0[name], s0b[name]) and not torch.equal(s0[name], s1[name]) and not torch.equal(s0[name], got[name])
    assert all(bool((f >= 0).all()) for f in s0.values())


def test_fisher_stats_are_named_as_the_model_files(archs, tmp_path):
    from evomerge.io.model_dir import ModelDir

    spec = CalibrationSpec(data=write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in word_texts(12)]), limit=12)
    path = fisher_stats(archs["gpt2"], spec, cache_dir=tmp_path / "cache")
    from safetensors.torch import load_file

    fishers = load_file(str(path))
    md = ModelDir(archs["gpt2"])
    assert set(fishers) == set(md.entries)  # the tied head is the embedding: stored once, under its file name
    assert all(tuple(fishers[n].shape) == md.shape(n) for n in fishers)


def test_merging_a_model_with_itself_on_its_own_stats_gives_it_back(zoo_models, tmp_path):
    from safetensors.torch import load_file

    from evomerge.io.model_dir import ModelDir

    spec = CalibrationSpec(task="sft_search", limit=16)
    grams = GramFile(gram_stats(zoo_models[0], spec, cache_dir=tmp_path))
    fishers = load_file(str(fisher_stats(zoo_models[0], spec, cache_dir=tmp_path)))
    md = ModelDir(zoo_models[0])
    assert set(fishers) == set(md.entries) and set(grams.names()) <= set(md.entries)
    for name in md.entries:
        w = md.get(name)
        torch.testing.assert_close(fisher_merge.merge([w, w], [fishers[name]] * 2, [0.5, 0.5]), w)
        if name in grams:
            g = grams.mean(name)
            torch.testing.assert_close(regmean.merge([w, w], [g, g], conv1d=name in grams.conv1d), w, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- cache


def count_forwards():
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, torch.nn.modules.module.register_module_forward_hook(hook)


def test_cache_hit_runs_no_forward_and_the_key_follows_inputs(zoo_models, tmp_path):
    a, b = zoo_models
    cache = tmp_path / "cache"
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"k:{w}>{w[::-1]}"} for w in ("abc", "bca", "cab", "hgf", "aed", "bbe", "ceh", "dag", "gab")])
    spec = CalibrationSpec(data=data, limit=9, batch_size=4)
    assert not stats_path("gram", a, spec, {"dtype": "float32"}, cache).exists()
    first = gram_stats(a, spec, cache_dir=cache)
    assert first == stats_path("gram", a, spec, {"dtype": "float32"}, cache)
    calls, handle = count_forwards()
    try:
        before = first.stat()
        again = gram_stats(a, spec, cache_dir=cache)
        assert calls[0] == 0 and again == first and again.stat().st_mtime_ns == before.st_mtime_ns
        f1 = fisher_stats(a, spec, cache_dir=cache)
        n = calls[0]
        assert n > 0 and fisher_stats(a, spec, cache_dir=cache) == f1 and calls[0] == n
    finally:
        handle.remove()
    key = lambda kind, model, s, settings: stats_path(kind, model, s, settings, cache).name  # noqa: E731
    base = key("gram", a, spec, {"dtype": "float32"})
    assert key("gram", b, spec, {"dtype": "float32"}) != base  # other weights
    assert key("gram", a, spec, {"dtype": "float64"}) != base  # other settings
    assert key("fisher", a, spec, {"dtype": "float32"}) != base  # other kind
    assert key("gram", a, CalibrationSpec(data=data, limit=8, batch_size=4), {"dtype": "float32"}) != base
    assert key("gram", a, CalibrationSpec(data=data, limit=9, batch_size=4, max_length=32), {"dtype": "float32"}) != base
    with open(data, "a") as f:
        f.write(json.dumps({"text": "k:ab>ba"}) + "\n")  # other data content, same path and settings
    assert key("gram", a, spec, {"dtype": "float32"}) != base
    assert fisher_stats(a, spec, labels="data", cache_dir=cache) != f1


# ----------------------------------------------------------------------------- calibration


def test_task_texts_are_prompt_and_target_in_a_seeded_subset():
    spec = CalibrationSpec(task="mir_search", limit=50)
    texts = load_texts(spec)
    assert len(texts) == 50 and texts == load_texts(CalibrationSpec(task="mir_search", limit=50))
    assert texts != load_texts(CalibrationSpec(task="mir_search", limit=50, seed=1))
    first = json.loads((Path(__file__).parents[1] / "evomerge/tasks/data/mir_search.jsonl").read_text().splitlines()[0])
    assert first["prompt"] + first["answer"] in load_texts(CalibrationSpec(task="mir_search", limit=1000))
    assert len(load_texts(CalibrationSpec(task="zoo_search", limit=1000))) == 600  # a group: all its tasks' docs
    english = load_texts(CalibrationSpec(task="en_arith", limit=3, seed=2))
    assert all(" = " in t and t[-1].isdigit() for t in english)  # "16 + 6 = 22": the target's space is its own


def test_batches_are_right_padded_and_truncated(zoo_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo_models[0])  # one token per character, after a BOS
    spec = CalibrationSpec(task="mir_search", max_length=6, batch_size=3, min_examples=1)
    out = batches(tok, ["k:a>", "k:abcdefgh>hg", "k:", "k:ab>"], spec)
    assert [b["input_ids"].shape for b in out] == [(3, 6), (1, 6)]
    assert out[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert out[0]["input_ids"][1].tolist() == tok("k:abcdefgh>hg")["input_ids"][:6]
    assert out[0]["input_ids"][2, 3:].tolist() == [tok.pad_token_id] * 3
    assert out[0]["input_ids"].dtype == out[0]["attention_mask"].dtype == torch.long


BAD = {
    "missing file": (lambda d: CalibrationSpec(data=str(d / "nope.jsonl")), "does not exist"),
    "not jsonl": (lambda d: CalibrationSpec(data=write_jsonl(d / "x.jsonl", ['{"text": "a"}', "text: b"])), "line 2 is not JSON"),
    "not an object": (lambda d: CalibrationSpec(data=write_jsonl(d / "x.jsonl", ['["a"]'])), "line 1 is a JSON list"),
    "missing field": (lambda d: CalibrationSpec(data=write_jsonl(d / "x.jsonl", [{"content": "a", "id": 1}])), "no field 'text'; its fields are ['content', 'id']"),
    "misspelt field": (lambda d: CalibrationSpec(data=write_jsonl(d / "x.jsonl", [{"text": "a"}]), field="txt"), "did you mean 'text'?"),
    "not a string": (lambda d: CalibrationSpec(data=write_jsonl(d / "x.jsonl", [{"text": 3}])), "is a int, not a string"),
    "too few": (lambda d: CalibrationSpec(data=write_jsonl(d / "x.jsonl", [{"text": "a"}] * 3)), "3 non-empty texts, fewer than min_examples=8"),
    "unknown task": (lambda d: CalibrationSpec(task="mir_serch"), "did you mean 'mir_search'?"),
    "no source": (lambda d: CalibrationSpec(), "exactly one of data"),
    "two sources": (lambda d: CalibrationSpec(data="x.jsonl", task="mir_search"), "exactly one of data"),
    "bad limit": (lambda d: CalibrationSpec(task="mir_search", limit=0), "limit must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_is_a_one_line_user_error(case, tmp_path):
    make, fragment = BAD[case]
    with pytest.raises(UserError) as e:
        load_texts(make(tmp_path))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_stats_on_512_examples_in_seconds(zoo_models, tmp_path):
    spec = CalibrationSpec(task="zoo_search", limit=512)
    load_texts(spec)  # the task's loading is not what is timed
    started = time.perf_counter()
    gram = gram_stats(zoo_models[0], spec, cache_dir=tmp_path, threads=1)
    gram_s = time.perf_counter() - started
    started = time.perf_counter()
    fisher = fisher_stats(zoo_models[0], spec, cache_dir=tmp_path, threads=1)
    fisher_s = time.perf_counter() - started
    print(f"tiny zoo model, 512 examples: gram {gram_s:.1f} s, fisher {fisher_s:.1f} s")
    assert GramFile(gram).count("lm_head.weight") > 512 and fisher.is_file()
    assert gram_s < 60 and fisher_s < 60
