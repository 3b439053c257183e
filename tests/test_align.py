"""Permutation alignment (Git Re-Basin) and ZipIt! on tiny real Llama (GQA), Qwen2 and GPT-2 models."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, make_model

from evomerge.align import activation_matching, align, apply_permutation, random_permutation, weight_matching, zipit
from evomerge.align.activations import build_model
from evomerge.align.permspec import kv_perm, perm_spec
from evomerge.align.rebasin import solve
from evomerge.align.residual import fold_norms, rotate_residual, unfold_norms
from evomerge.align.rotations import align_heads, random_rotations, rotate_heads
from evomerge.align.zipit import zip_pairs
from evomerge.errors import UserError
from evomerge.io.model_dir import ModelDir

ARCHS = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: (state, config) of two independent random models."""
    root = tmp_path_factory.mktemp("align")
    out = {}
    for k, arch in enumerate(ARCHS):
        dirs = [ModelDir(make_model(root / f"{arch}{s}", arch, seed=100 + 10 * k + s)) for s in (0, 1)]
        out[arch] = [d.load_all() for d in dirs], dirs[0].config
    return out


def batches(seed: int = 0, count: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0  # padded rows: their tail must not enter the statistics
        mask[3, 5:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(state, config, batch=None):
    batch = batch or batches(seed=9, count=1)[0]
    with torch.no_grad():
        return build_model(state, config)(**batch).logits


def is_identity(perms) -> bool:
    return all(torch.equal(p, torch.arange(len(p))) for p in perms.values())


def assert_states_close(x, y, atol=0.0):
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], atol=atol, rtol=0, msg=name)


def permuted(state, config, seed=1):
    perms = random_permutation(config, torch.Generator().manual_seed(seed))
    return apply_permutation(state, config, perms), perms


@pytest.mark.parametrize("arch", ARCHS)
def test_aligning_a_model_to_itself_is_the_identity(models, arch):
    (a, _), config = models[arch]
    assert is_identity(weight_matching(a, a, config))
    assert is_identity(activation_matching(a, a, config, batches()))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_random_permutation_is_a_symmetry(models, arch):
    (a, _), config = models[arch]
    b, perms = permuted(a, config)
    assert not is_identity(perms)
    assert all(not torch.equal(a[n], b[n]) for n in a if a[n].dim() == 2)
    torch.testing.assert_close(logits(b, config), logits(a, config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("arch", ARCHS)
def test_realigning_a_permuted_model_recovers_it(models, arch, method):
    (a, _), config = models[arch]
    b, _ = permuted(a, config, seed=2)
    assert_states_close(align(a, b, config, method=method, batches=batches()), a)


def rotated(state, config, seed=1):
    return rotate_heads(state, config, random_rotations(config, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_random_head_rotation_is_a_symmetry(models, arch):
    (a, _), config = models[arch]
    b = rotated(a, config)
    assert all(not torch.equal(a[n], b[n]) for n in a if "self_attn" in n)
    torch.testing.assert_close(logits(b, config), logits(a, config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_realigning_a_permuted_and_rotated_model_recovers_it(models, arch, method):
    """Heads matched by their circuits, then rotated back: the original to float tolerance."""
    (a, _), config = models[arch]
    b, _ = permuted(rotated(a, config, seed=4), config, seed=5)
    assert_states_close(align(a, b, config, method=method, batches=batches()), a, atol=1e-5)
    # permutations alone cannot undo the rotations
    plain = align(a, b, config, method=method, batches=batches(), rotate=False)
    assert max((plain[n] - a[n]).abs().max() for n in a) > 1e-2


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_folding_the_gains_and_rotating_the_stream_are_symmetries(models):
    (a, _), config = models["llama"]
    folded = fold_norms(a, config)
    assert all(torch.equal(folded[n], torch.ones_like(a[n])) for n in a if n.endswith("norm.weight"))
    torch.testing.assert_close(logits(folded, config), logits(a, config), atol=1e-5, rtol=1e-5)
    turned = rotate_residual(folded, config, random_orthogonal(config["hidden_size"], 3))
    torch.testing.assert_close(logits(turned, config), logits(a, config), atol=1e-5, rtol=1e-5)
    back = unfold_norms(turned, config, a)  # written with a's gains again
    assert all(torch.equal(back[n], a[n]) for n in a if n.endswith("norm.weight"))
    torch.testing.assert_close(logits(back, config), logits(a, config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_realigning_a_model_with_a_rotated_stream_recovers_it(models, method):
    """Stream rotated (no permutation could undo it), heads rotated, units permuted: activation
    matching gives back the model; weight matching at least comes closer than permutations do."""
    (a, _), config = models["llama"]
    moved = rotate_residual(fold_norms(a, config), config, random_orthogonal(config["hidden_size"], 7))
    b, _ = permuted(rotated(moved, config, seed=8), config, seed=9)
    got = align(a, b, config, method=method, batches=batches(count=4))
    plain = align(a, b, config, method=method, batches=batches(count=4), rotate=False)
    if method == "activation":
        assert_states_close(got, a, atol=1e-4)
    assert inner_product(a, got) > inner_product(a, plain)
    torch.testing.assert_close(logits(got, config), logits(a, config), atol=1e-4, rtol=1e-4)


def test_head_rotations_of_independent_models_raise_their_inner_product(models):
    (a, b), config = models["llama"]
    b = align(a, b, config, rotate=False)
    assert inner_product(a, align_heads(a, b, config)) > inner_product(a, b)


def test_bf16_states_align_in_bf16(tmp_path):
    md = ModelDir(make_model(tmp_path / "m", "llama", seed=5, dtype=torch.bfloat16))
    a, config = md.load_all(), md.config
    b, _ = permuted(a, config, seed=3)
    back = align(a, b, config, method="weight")
    assert {t.dtype for t in back.values()} == {torch.bfloat16}
    assert_states_close(back, a)


def test_gqa_query_heads_stay_in_their_kv_group(models):
    (a, _), config = models["llama"]
    spec = perm_spec(config)
    assert spec.heads_per_kv == 2
    seen = set()
    for seed in range(20):
        perms = random_permutation(config, torch.Generator().manual_seed(seed))
        for i in range(spec.num_layers):
            p = perms[f"heads.{i}"]
            kv_perm(p, 2)  # raises when a query head leaves its kv group
            seen.add(tuple(p.tolist()))
    assert len(seen) == 8  # 2 kv slots x 2 orders in each: every legal head permutation turns up

    free = {f"heads.{i}": torch.tensor([2, 1, 0, 3]) for i in range(spec.num_layers)}
    with pytest.raises(ValueError, match="kv head"):
        apply_permutation(a, config, free)

    # Swap query heads 0 and 2 (q rows and o columns) but not their kv heads: the
    # weights now favour the cross-group swap, which a free matcher would take back.
    b = dict(a)
    hd = 8
    swap = torch.cat([torch.arange(2 * hd, 3 * hd), torch.arange(hd, 2 * hd), torch.arange(0, hd), torch.arange(3 * hd, 4 * hd)])
    for i in range(spec.num_layers):
        q, o = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.o_proj.weight"
        b[q], b[o] = a[q][swap], a[o][:, swap]
    for i, p in ((i, weight_matching(a, b, config)[f"heads.{i}"]) for i in range(spec.num_layers)):
        kv_perm(p, 2)
        assert p.tolist() != [2, 1, 0, 3], i


def test_head_assignment_is_the_best_gqa_respecting_one():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        sim = torch.randn(4, 4, generator=gen, dtype=torch.float64).numpy()
        sim_kv = torch.randn(2, 2, generator=gen, dtype=torch.float64).numpy()
        legal = [list(itertools.chain.from_iterable([s * 2 + j for j in inner] for s, inner in zip(slots, inners)))
                 for slots in itertools.permutations(range(2)) for inners in itertools.product(itertools.permutations(range(2)), repeat=2)]

        def score(p):
            return sum(sim[i, p[i]] for i in range(4)) + sum(sim_kv[g, p[2 * g] // 2] for g in range(2))

        best = max(legal, key=score)
        assert solve(sim, sim_kv, 2).tolist() == best


def inner_product(x, y) -> float:
    return sum(float((x[n].double() * y[n].double()).sum()) for n in x)


def test_weight_matching_two_independent_llamas_raises_their_inner_product(models):
    (a, b), config = models["llama"]
    perms = weight_matching(a, b, config)
    aligned = apply_permutation(b, config, perms)
    before, after = inner_product(a, b), inner_product(a, aligned)
    assert after > before + 0.05 * abs(before) + 1.0, (before, after)
    torch.testing.assert_close(logits(aligned, config), logits(b, config), atol=1e-5, rtol=1e-5)
    assert after >= inner_product(a, apply_permutation(b, config, random_permutation(config, torch.Generator().manual_seed(0))))


def mlp_width(config) -> int:
    return config.get("n_inner") or config.get("intermediate_size") or 4 * config["n_embd"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zipit_of_a_model_with_a_permuted_copy_keeps_its_function(models, arch):
    (a, _), config = models[arch]
    b, _ = permuted(a, config, seed=4)
    state, new_config = zipit(a, b, config, batches(), ratio=1.0)
    assert mlp_width(new_config) == mlp_width(config)
    torch.testing.assert_close(logits(state, new_config), logits(a, config), atol=1e-4, rtol=1e-4)


def test_zipit_without_merges_is_the_average_of_both_mlps(models):
    (a, b), config = models["llama"]
    state, new_config = zipit(a, b, config, batches(), ratio=0.0)
    n = config["intermediate_size"]
    assert new_config["intermediate_size"] == 2 * n
    b_aligned = align(a, b, config, method="activation", batches=batches(), rotate=False)  # ZipIt aligns by permutations
    merged, ma, mb = build_model(state, new_config), build_model(a, config), build_model(b_aligned, config)
    x = torch.randn(3, 5, config["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(config["num_hidden_layers"]):
            want = (ma.model.layers[i].mlp(x) + mb.model.layers[i].mlp(x)) / 2
            torch.testing.assert_close(merged.model.layers[i].mlp(x), want, atol=1e-5, rtol=1e-5)
    norm = "model.layers.1.input_layernorm.weight"
    torch.testing.assert_close(state[norm], (a[norm] + b_aligned[norm]) / 2)
    assert not torch.allclose(a[norm], b_aligned[norm])


def test_zipit_merges_follow_the_paper_rule():
    corr = torch.eye(4)
    for (i, j), c in {(0, 1): 0.9, (2, 3): 0.8, (0, 2): 0.5, (0, 3): 0.4, (1, 2): 0.3, (1, 3): 0.45}.items():
        corr[i, j] = corr[j, i] = c
    assert zip_pairs(corr, 2, beta=0.0) == [[0, 2], [1, 3]]  # no same-model budget: across only
    assert zip_pairs(corr, 2, beta=1.0) == [[0, 1], [2, 3]]  # the most correlated pairs, within each model
    assert zip_pairs(corr, 1, beta=1.0) == [[0, 2], [1], [3]]  # budget: int(1 // 2 * beta) = 0 same-model merges
    assert zip_pairs(corr, 0, beta=1.0) == [[0], [1], [2], [3]]


def test_zipit_of_the_first_layer_pads_the_rest_and_loads(models, tmp_path):
    from transformers import AutoModelForCausalLM

    (a, _), config = models["llama"]
    b, _ = permuted(a, config, seed=6)
    state, new_config = zipit(a, b, config, batches(), ratio=1.0, layers=1)
    n = config["intermediate_size"]
    assert new_config["intermediate_size"] == 2 * n
    gate = state["model.layers.0.mlp.gate_proj.weight"]
    assert gate.shape[0] == 2 * n and not gate[:n].eq(0).all() and gate[n:].eq(0).all()
    assert state["model.layers.0.mlp.down_proj.weight"][:, n:].eq(0).all()

    build_model(state, new_config).save_pretrained(tmp_path / "zipped")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zipped").eval()
    with torch.no_grad():
        out = loaded(**batches(seed=9, count=1)[0]).logits
    torch.testing.assert_close(out, logits(a, config), atol=1e-4, rtol=1e-4)


def test_zipit_refuses_out_of_range_ratios(models):
    (a, b), config = models["llama"]
    with pytest.raises(UserError, match="ratio"):
        zipit(a, b, config, batches(), ratio=1.5)


def test_unsupported_model_type_is_a_one_line_user_error(models):
    (a, b), config = models["llama"]
    bad = {**config, "model_type": "bert"}
    for call in (lambda: weight_matching(a, b, bad), lambda: apply_permutation(a, bad, {}),
                 lambda: random_permutation(bad), lambda: zipit(a, b, bad, batches())):
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "'bert'" in msg and "llama" in msg and "gpt2" in msg


def test_unknown_tensors_are_refused(models):
    (a, b), config = models["llama"]
    extra = {**a, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    with pytest.raises(UserError, match="q_norm"):
        weight_matching(extra, {**b, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, config)
    with pytest.raises(UserError, match="differ"):
        weight_matching(extra, b, config)


def test_statistics_leave_out_masked_tokens(models):
    from evomerge.align.activations import joint_moments

    (a, b), config = models["gpt2"]
    data = batches()
    moments = joint_moments(a, b, config, perm_spec(config), data)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in data)
    assert tokens < sum(batch["attention_mask"].numel() for batch in data)
    assert {site.count for sites in moments.values() for site in sites} == {tokens}
