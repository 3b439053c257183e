"""Merge kernels against hand-worked examples and an argsort reference of mergekit's
task-vector algorithm (written here from its description, on small CPU tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import UserError
from evomerge.merge import rng, sparsify, task_vector, threads
from evomerge.merge.kernels import KERNELS, get_kernel, uses_sorted_abs, with_defaults

TASK_VECTOR_KERNELS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(name: str, tensors, base, model_params, params=None, seed: int = 0) -> torch.Tensor:
    return get_kernel(name).fn(tensors, base, model_params, params or {}, seed, stats=stats_for(name, tensors))


def stats_for(name: str, tensors) -> list:
    """What a data-dependent kernel reads beside each tensor: a positive Fisher, a Gram
    (a positive definite [in, in] matrix for a 2-d weight)."""
    kind = get_kernel(name).stats
    gen = torch.Generator().manual_seed(7)
    if kind == "fisher":
        return [torch.rand(t.shape, generator=gen) + 0.1 for t in tensors]
    if kind == "gram":
        out = []
        for t in tensors:
            x = torch.randn(4 * t.shape[-1], t.shape[-1], generator=gen, dtype=torch.float64)
            out.append(x.T @ x if t.dim() == 2 else None)
        return out
    return []


PER_TENSOR_KERNELS = [name for name, k in KERNELS.items() if not k.whole_model]


def declared_only(name: str, model_params: list[dict]) -> list[dict]:
    """The per-model parameters that kernel ``name`` declares (e.g. no gamma for ties)."""
    declared = {spec.name for spec in get_kernel(name).params}
    return [{k: v for k, v in mp.items() if k in declared} for mp in model_params]


def minimal_params(name: str, n_models: int) -> tuple[list[dict], dict]:
    if name == "slerp":
        return [{}] * n_models, {"t": 0.3}
    if name in ("passthrough", "model_stock", "karcher", "sce", "arcee_fusion", "ram", "ramplus_tl"):
        return [{}] * n_models, {}
    if name == "nearswap":
        return [{}] * n_models, {"t": 0.01}
    return [{"weight": 0.5}] * n_models, {}


# --- reference: mergekit's generalized task arithmetic, argsort-based -------------


def reference_task_vector(tensors, base, model_params, params, seed, sparsification, consensus):
    b = base.float().flatten()
    n = b.numel()
    deltas, weights = [], []
    for i, (x, mp) in enumerate(zip(tensors, model_params)):
        d = x.float().flatten() - b
        density = mp.get("density", 1.0)
        if sparsification and density < 1:
            order = torch.argsort(d.abs())  # ascending
            keep = torch.zeros(n, dtype=torch.bool)
            if sparsification == "magnitude":
                keep[order[n - int(density * n):]] = True
            elif sparsification == "magnitude_outliers":
                target, n_top = int(density * n), int(mp["gamma"] * n)
                n_bot = n - target - n_top
                if n_bot < 0:
                    n_top, n_bot = n_top + n_bot, 0
                keep[order[n_bot:n - n_top]] = True
            else:
                keep = rng.uniform(seed, i, torch.arange(n)) < density
            masked = d * keep
            rescale = params["rescale"]
            if rescale == "l1":
                before, after = d.abs().sum(), masked.abs().sum()
                if before >= 1e-7 and after >= 1e-7:
                    masked = masked * (before / after)
            elif rescale == "inverse_density":
                masked = masked / density
            d = masked
        deltas.append(d)
        weights.append(mp["weight"])
    w = torch.tensor(weights).unsqueeze(1)
    weighted = torch.stack(deltas) * w
    if consensus:
        majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum() if abs(float(w.sum())) >= 1e-8 else torch.tensor(1.0)
    if params["normalize"]:
        mixed = mixed / divisor
    return (b + params["lambda"] * mixed).view(base.shape)


PRESETS = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
}


@pytest.mark.parametrize("name", TASK_VECTOR_KERNELS)
@pytest.mark.parametrize("normalize", [True, False])
def test_task_vector_presets_match_argsort_reference(name, normalize):
    base = randn(40, 30, seed=1)
    tensors = [base + 0.1 * randn(40, 30, seed=2 + i) for i in range(3)]
    model_params = [
        {"weight": 0.7, "density": 0.5, "gamma": 0.05},
        {"weight": -0.2, "density": 0.3, "gamma": 0.0},
        {"weight": 0.4, "density": 0.9, "gamma": 0.2},
    ]
    model_params = declared_only(name, model_params)
    params = {"normalize": normalize, "lambda": 1.3}
    has_rescale = any(spec.name == "rescale" for spec in get_kernel(name).params)
    for rescale in ["none", "l1", "inverse_density"] if has_rescale else [None]:
        if rescale:
            params["rescale"] = rescale
        got = run(name, tensors, base, model_params, params, seed=7)
        filled_models, filled = with_defaults(get_kernel(name), model_params, params)
        want = reference_task_vector(tensors, base, filled_models, {"rescale": "none", **filled}, 7, *PRESETS[name])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- every kernel ----------------------------------------------------------------


@pytest.mark.parametrize("name", PER_TENSOR_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_inputs_give_the_input(name, dtype):
    x = randn(16, 8, dtype=dtype)
    n_models = 1 if name in ("slerp", "passthrough", "nearswap", "arcee_fusion") else 2
    model_params, params = minimal_params(name, n_models)
    out = run(name, [x.clone() for _ in range(n_models)], x.clone(), model_params, params)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, x.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_sources_give_the_source(name, dtype):
    base, x = randn(16, 8, seed=1, dtype=dtype), randn(16, 8, seed=2, dtype=dtype)
    model_params = [{"weight": 0.3, "density": 0.6}, {"weight": 0.9, "density": 0.6}]
    if name == "linear":
        model_params = [{"weight": 0.3}, {"weight": 0.9}]
    out = run(name, [x, x.clone()], base, model_params, {"normalize": True})
    assert out.dtype == torch.float32
    # Trimmed entries fall back to the base, so compare where the sources were kept.
    kept = out != base.float()
    assert kept.float().mean() >= (0.5 if name != "linear" else 1.0)
    torch.testing.assert_close(out[kept], x.float()[kept])


def test_ties_density_one_of_one_model_gives_that_model():
    base, x = randn(32, 16, seed=1, dtype=torch.bfloat16), randn(32, 16, seed=2, dtype=torch.bfloat16)
    out = run("ties", [x], base, [{"weight": 0.37, "density": 1.0}])
    torch.testing.assert_close(out, x.float())


def test_no_sources_give_the_base():
    base = randn(4, 4, dtype=torch.bfloat16)
    for name in ["ties", "dare_ties", "slerp"]:
        out = run(name, [], base, [], {"t": 0.5} if name == "slerp" else {})
        assert torch.equal(out, base.float())


# --- linear, task arithmetic, TIES by hand ------------------------------------------


def test_linear_weights_normalize():
    a, b = randn(5, 7, seed=1), randn(5, 7, seed=2)
    one = run("linear", [a, b], None, [{"weight": 0.2}, {"weight": 0.5}])
    two = run("linear", [a, b], None, [{"weight": 0.4}, {"weight": 1.0}])
    assert torch.equal(one, two)
    torch.testing.assert_close(one, (0.2 * a + 0.5 * b) / 0.7)
    raw = run("linear", [a, b], None, [{"weight": 0.2}, {"weight": 0.5}], {"normalize": False})
    torch.testing.assert_close(raw, 0.2 * a + 0.5 * b)


def test_task_arithmetic_formula():
    base = randn(6, 5, seed=1)
    xs = [randn(6, 5, seed=2), randn(6, 5, seed=3)]
    out = run("task_arithmetic", xs, base, [{"weight": 0.6}, {"weight": -0.3}], {"lambda": 0.8})
    torch.testing.assert_close(out, base + 0.8 * (0.6 * (xs[0] - base) - 0.3 * (xs[1] - base)))


def test_ties_by_hand():
    base = torch.full((2, 3), 1.0)
    a = base + torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.5]])  # trim keeps 3, -2, -1.5
    b = base + torch.tensor([[-3.0, 1.0, 0.25], [2.0, -3.5, -2.5]])  # trim keeps -3.5, -3, -2.5
    out = run("ties", [a, b], base, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}])
    # weighted: a [[0,-2,0],[0,3,-1.5]], b [[-1.5,0,0],[0,-1.75,-1.25]]; elected signs
    # [[-,-,+],[+,+,-]]; b's -1.75 disagrees; zeros join no divisor; empty divisor -> 1.
    want = base + torch.tensor([[-1.5 / 0.5, -2.0 / 1.0, 0.0], [0.0, 3.0 / 1.0, -2.75 / 1.5]])
    torch.testing.assert_close(out, want)


# --- slerp -------------------------------------------------------------------------


def test_slerp_endpoints_and_quarter_circle():
    base, other = randn(10, 10, seed=1), randn(10, 10, seed=2)
    torch.testing.assert_close(run("slerp", [other], base, [{}], {"t": 0.0}), base)
    torch.testing.assert_close(run("slerp", [other], base, [{}], {"t": 1.0}), other)
    e0, e1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])  # unnormalized, orthogonal
    half = run("slerp", [e1], e0, [{}], {"t": 0.5})
    torch.testing.assert_close(half, torch.tensor([2.0, 1.0]) * math.sqrt(0.5))


def test_slerp_near_parallel_falls_back_to_lerp():
    base = randn(100, seed=1)
    other = 3.0 * base + 1e-4 * randn(100, seed=2)  # cos ~ 1, different norms
    out = run("slerp", [other], base, [{}], {"t": 0.25})
    torch.testing.assert_close(out, 0.75 * base + 0.25 * other)


def test_slerp_takes_exactly_one_other_model():
    x = randn(4)
    with pytest.raises(UserError, match="exactly one other model"):
        run("slerp", [x, x], x, [{}, {}], {"t": 0.5})


@pytest.mark.parametrize("weight", [0.5, 0.3])
def test_ties_exact_cancellation_elects_plus(weight):
    """bf16 fine-tunes often sit one step either side of the base: the weighted sum is
    exactly 0 there, the elected sign is +, and the positive delta wins."""
    base = torch.full((4,), 0.5, dtype=torch.bfloat16)
    step = 2.0**-8  # one bf16 step at 0.5
    a = base + torch.tensor([step, -step, 2 * step, 0.0], dtype=torch.bfloat16)
    b = base + torch.tensor([-step, step, -step, 0.0], dtype=torch.bfloat16)
    got = run("ties", [a, b], base, [{"weight": weight, "density": 1.0}] * 2)
    want = torch.tensor([0.5 + step, 0.5 + step, 0.5 + 2 * step, 0.5])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- magnitude trim and selection ---------------------------------------------------


@pytest.mark.parametrize("numel", [1000, (1 << 19) + 7])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.97])
def test_magnitude_trim_keeps_exactly_k_like_argsort(numel, density):
    delta = randn(numel, seed=3)  # distinct magnitudes
    threshold = sparsify.magnitude_threshold(sparsify.Magnitudes.of_values(delta.abs()), density)
    kept = delta.abs() >= threshold
    k = int(density * numel)
    assert int(kept.sum()) == k
    reference = torch.zeros(numel, dtype=torch.bool)
    reference[torch.argsort(delta.abs(), descending=True)[:k]] = True
    assert torch.equal(kept, reference)
    sorted_abs = sparsify.sorted_abs_delta(delta, torch.zeros(numel))
    assert torch.equal(sparsify.magnitude_threshold(sparsify.Magnitudes.of_sorted(sorted_abs), density), threshold)
    sampled = sparsify.Magnitudes.of_delta(delta, torch.zeros(numel))
    assert torch.equal(sparsify.magnitude_threshold(sampled, density), threshold)


def test_magnitude_threshold_edges():
    delta = randn(10)
    assert float(sparsify.magnitude_threshold(sparsify.Magnitudes.of_values(delta.abs()), 1.0)) == 0.0
    assert math.isinf(float(sparsify.magnitude_threshold(sparsify.Magnitudes.of_values(delta.abs()), 0.05)))  # k = 0 keeps none


@pytest.mark.parametrize("rank_fraction", [0.0, 1e-5, 0.3, 0.5, 0.99999, 1.0])
def test_kth_smallest_matches_sort_on_big_tensors_with_ties(rank_fraction):
    n = (1 << 20) + 3
    values = randn(n, seed=5).abs()
    values[: n // 3] = 0.0  # many ties, as bf16 deltas have
    values[n // 3 : n // 2] = torch.round(values[n // 3 : n // 2] * 8) / 8
    rank = min(max(1, round(rank_fraction * n)), n)
    assert sparsify.kth_smallest(values, rank) == values.sort().values[rank - 1]
    strided_ties = torch.arange(n, dtype=torch.float32) % 7  # defeats a strided sample
    got = sparsify.kth_smallest(strided_ties, rank)
    assert got == strided_ties.sort().values[rank - 1]


@pytest.mark.parametrize("fractions", [(0.5,), (1e-6, 0.999999), (0.0, 1.0), (0.3, 0.3)])
def test_every_form_of_magnitudes_gives_the_exact_order_statistics(fractions):
    n = (1 << 20) + 5
    base = randn(n, seed=7, dtype=torch.bfloat16)
    source = base.clone()
    moved = torch.arange(n) % 3 != 0  # a third unchanged: many tied zero magnitudes
    source[moved] = (base[moved].float() + 0.01 * randn(int(moved.sum()), seed=8)).bfloat16()
    magnitudes = (source.float() - base.float()).abs()
    reference = magnitudes.sort().values
    ranks = [min(max(1, round(f * n)), n) for f in fractions]
    want = [float(reference[r - 1]) for r in ranks]
    forms = [sparsify.Magnitudes.of_delta(source, base), sparsify.Magnitudes.of_values(magnitudes),
             sparsify.Magnitudes.of_values(magnitudes.clone(), owned=True),
             sparsify.Magnitudes.of_sorted(sparsify.sorted_abs_delta(source, base))]
    for form in forms:
        assert [float(v) for v in form.kth(ranks)] == want
    assert torch.equal(magnitudes, (source.float() - base.float()).abs())  # not owned: left as it was


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_sorted_abs_path_equals_selection_path(name):
    assert uses_sorted_abs(get_kernel(name))
    base = randn(700, 400, seed=1, dtype=torch.bfloat16)  # above the direct-kthvalue size
    xs = [(base.float() + 0.05 * randn(700, 400, seed=2 + i)).bfloat16() for i in range(2)]
    model_params = [{"weight": 0.6, "density": 0.4, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}]
    model_params = declared_only(name, model_params)
    selected = run(name, xs, base, model_params)
    with_sorted = [dict(mp, sorted_abs=sparsify.sorted_abs_delta(x, base)) for mp, x in zip(model_params, xs)]
    assert torch.equal(run(name, xs, base, with_sorted), selected)


def test_breadcrumbs_drops_top_gamma_and_bottom_fraction():
    n = 1000
    delta = randn(n, seed=4)
    out = run("breadcrumbs", [delta], torch.zeros(n), [{"weight": 1.0, "density": 0.8, "gamma": 0.05}])
    kept = out != 0
    ranks = torch.argsort(torch.argsort(delta.abs()))  # 0 = smallest
    assert int(kept.sum()) == 800
    assert torch.equal(kept, (ranks >= 150) & (ranks < 950))  # 150 smallest, 50 largest gone
    torch.testing.assert_close(out[kept], delta[kept])
    # gamma beyond what the density allows: outliers are given back first (mergekit)
    out = run("breadcrumbs", [delta], torch.zeros(n), [{"weight": 1.0, "density": 0.98, "gamma": 0.05}])
    assert torch.equal(out != 0, ranks < 980)


# --- DARE ----------------------------------------------------------------------------


def test_dare_keep_rate_and_rescales():
    n = 1_000_000
    delta = randn(n, seed=6)
    zeros = torch.zeros(n)
    for density in [0.1, 0.5, 0.9]:
        out = run("dare_linear", [delta], zeros, [{"weight": 1.0, "density": density}], {"rescale": "l1"}, seed=3)
        kept = out != 0
        assert abs(float(kept.float().mean()) - density) < 0.002  # ~4 standard deviations
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum())
        inverse = run("dare_linear", [delta], zeros, [{"weight": 1.0, "density": density}],
                      {"rescale": "inverse_density"}, seed=3)
        torch.testing.assert_close(inverse, delta * kept / density)
        plain = run("dare_linear", [delta], zeros, [{"weight": 1.0, "density": density}], {"rescale": False}, seed=3)
        torch.testing.assert_close(plain, delta * kept)


def test_dare_is_deterministic_per_seed_and_independent_across_models():
    n = 100_000
    base = randn(n, seed=1)
    xs = [base + randn(n, seed=2), base + randn(n, seed=3)]
    params = [{"weight": 0.5, "density": 0.5}] * 2
    one = run("dare_ties", xs, base, params, seed=11)
    assert torch.equal(one, run("dare_ties", xs, base, params, seed=11))
    assert not torch.equal(one, run("dare_ties", xs, base, params, seed=12))
    # sources 1 and 2 over a zero base: the output says which of them was kept
    coded = run("dare_linear", [torch.ones(n), torch.full((n,), 2.0)], torch.zeros(n),
                [{"weight": 1.0, "density": 0.5}] * 2, {"rescale": "none"})
    kept = [(coded == 1) | (coded == 3), coded >= 2]
    assert abs(float(kept[0].float().mean()) - 0.5) < 0.01
    assert abs(float((kept[0] & kept[1]).float().mean()) - 0.25) < 0.01


# --- rng ------------------------------------------------------------------------------


def test_rng_is_chunking_invariant_and_in_range():
    index = torch.arange(0, 1_000_003, dtype=torch.int64)
    whole = rng.uniform(5, 2, index)
    chunked = torch.cat([rng.uniform(5, 2, part) for part in index.split(65_536)])
    assert torch.equal(whole, chunked)
    assert torch.equal(rng.uniform(5, 2, index.flip(0)), whole.flip(0))
    assert 0.0 <= float(whole.min()) and float(whole.max()) < 1.0
    assert abs(float(whole.mean()) - 0.5) < 1e-3
    assert not torch.equal(whole, rng.uniform(6, 2, index))
    assert not torch.equal(whole, rng.uniform(5, 3, index))
    # Pinned values: a change here changes every DARE merge ever recorded.
    assert rng.random_bits(rng.stream_key(0, 0), torch.arange(4)).tolist() == PINNED_BITS


PINNED_BITS = [13380513, 741121, 12591, 8223688]


@pytest.mark.parametrize("start, stop", [(0, 4), (0, 70_001), (123_457, 200_000), (2**32 - 5_000, 2**32)])
def test_numpy_random_bits_equal_the_tensor_ones(start, stop):
    keys = [rng.stream_key(0, 0), rng.stream_key(5, 3), 0, 2**32 - 1]
    tensor_bits = rng.random_bits(torch.tensor(keys)[:, None], torch.arange(start, stop))
    assert torch.equal(torch.from_numpy(rng.random_bits_range(keys, start, stop).astype("int64")), tensor_bits)


def test_packed_dare_masks_unpack_to_the_tensor_masks(monkeypatch):
    monkeypatch.setattr(sparsify, "_STEP", 1 << 12)  # several blocks, the last one partial
    n, keys = 20_003, [rng.stream_key(3, 0), rng.stream_key(3, 1)]
    cutoffs = [rng.keep_cutoff(d) for d in (0.3, 1.0)]
    packed = sparsify.dare_keep_bits(keys, cutoffs, n)
    want = sparsify.dare_keep(torch.arange(n), torch.tensor(keys)[:, None], torch.tensor(cutoffs)[:, None])
    for start, stop in [(0, n), (5, 4_101), (4_096, 8_192), (19_999, n)]:  # unaligned starts too
        assert torch.equal(sparsify.unpack_keep(packed, start, stop), want[:, start:stop].float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_mode", ["auto", "0"])  # auto: the fused kernel on CUDA
@pytest.mark.parametrize("name", ["dare_ties", "ties", "breadcrumbs_ties"])
def test_cuda_merges_equal_the_cpu_ones(name, compile_mode, monkeypatch):
    monkeypatch.setenv("EVOMERGE_COMPILE", compile_mode)
    index = torch.arange(0, 2_000_003, dtype=torch.int64)
    assert torch.equal(rng.uniform(9, 1, index), rng.uniform(9, 1, index.cuda()).cpu())
    base = randn(1000, 1100, seed=1, dtype=torch.bfloat16)  # above fused._MIN_NUMEL
    xs = [(base.float() + 0.05 * randn(1000, 1100, seed=2 + i)).bfloat16() for i in range(2)]
    params = [{"weight": 0.5, "density": 0.3, "gamma": 0.01}, {"weight": 0.7, "density": 0.6, "gamma": 0.02}]
    params = declared_only(name, params)
    on_cpu = run(name, xs, base, params, seed=4)
    on_cuda = run(name, [x.cuda() for x in xs], base.cuda(), params, seed=4).cpu()
    assert torch.equal(on_cpu != base.float(), on_cuda != base.float())
    torch.testing.assert_close(on_cpu, on_cuda)


# --- execution path: one pass over chunks ----------------------------------------------


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "dare_linear"])
def test_chunking_does_not_change_the_result(name, monkeypatch):
    """The CPU's small steps give what one whole-tensor step (the GPU's) gives."""
    base = randn(601, 500, seed=1, dtype=torch.bfloat16)
    xs = [(base.float() + 0.1 * randn(601, 500, seed=2 + i)).bfloat16() for i in range(3)]
    params = [{"weight": 0.5, "density": 0.4, "gamma": 0.01}, {"weight": 0.8, "density": 0.6, "gamma": 0.02},
              {"weight": 0.3, "density": 1.0, "gamma": 0.0}]
    params = declared_only(name, params)
    monkeypatch.setattr(task_vector, "_CPU_CHUNK", base.numel())
    whole = run(name, xs, base, params, seed=3)
    monkeypatch.setattr(task_vector, "_CPU_CHUNK", 30_001)
    chunked = run(name, xs, base, params, seed=3)
    assert torch.equal(chunked != base.float(), whole != base.float())
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_compiled_combine_equals_the_eager_loop(name, monkeypatch):
    """The fused (GPU default) and eager (CPU default) combines agree; compiled here on the CPU."""
    base = randn(700, 400, seed=1, dtype=torch.bfloat16)
    xs = [(base.float() + 0.1 * randn(700, 400, seed=2 + i)).bfloat16() for i in range(3)]
    xs[1][:5] = (2 * base[:5].float() - xs[0][:5].float()).bfloat16()  # exact cancellations
    params = [{"weight": 0.5, "density": 0.4, "gamma": 0.01}, {"weight": 0.5, "density": 0.6, "gamma": 0.02},
              {"weight": 0.3, "density": 0.9, "gamma": 0.0}]
    params = declared_only(name, params)
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    eager = run(name, xs, base, params, seed=3)
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    compiled = run(name, xs, base, params, seed=3)
    assert torch.equal(compiled != base.float(), eager != base.float())
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, step, parts", [(10, 3, 2), (1000, 7, 3), (5, 10, 4), (64, 8, 8), (1, 1, 1)])
def test_thread_ranges_cover_the_tensor_on_step_boundaries(n, step, parts):
    got = threads.ranges(n, step, parts)
    assert got[0][0] == 0 and got[-1][1] == n and len(got) <= parts
    assert all(lo < hi and lo % step == 0 for lo, hi in got)
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))


def test_kernel_threads_work_in_a_forked_child():
    """A child forked after the pool exists gets its own (the parent's threads are not there).
    torch's own OpenMP threads do not survive a fork either, so the child's plain operations
    run on one thread; the kernel's ranges need none of them."""
    import multiprocessing

    x = torch.arange(1 << 19, dtype=torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run("linear", [x, x], None, [{"weight": 1.0}, {"weight": 1.0}])  # creates the pool here
        with multiprocessing.get_context("fork").Pool(1) as pool:
            total = pool.apply_async(_linear_sum_in_child).get(timeout=30)
    finally:
        torch.set_num_threads(before)
    assert total == float(x.sum())


def _linear_sum_in_child() -> float:
    torch.set_num_threads(1)
    x = torch.arange(1 << 19, dtype=torch.float32)
    torch.set_num_threads(2)
    merged = run("linear", [x, x], None, [{"weight": 1.0}, {"weight": 1.0}])
    torch.set_num_threads(1)
    return float(merged.sum())


@pytest.mark.parametrize("name", ["linear", "ties", "dare_ties", "breadcrumbs"])
def test_thread_count_does_not_change_the_result(name, monkeypatch):
    monkeypatch.setattr(task_vector, "_CPU_CHUNK", 10_000)  # many chunks per thread
    base = randn(601, 500, seed=1, dtype=torch.bfloat16)
    xs = [(base.float() + 0.1 * randn(601, 500, seed=2 + i)).bfloat16() for i in range(2)]
    params = [{"weight": 0.5, "density": 0.4, "gamma": 0.01}, {"weight": 0.8, "density": 0.6, "gamma": 0.02}]
    params = declared_only(name, params)
    if name == "linear":
        xs = [base, *xs]
        params = [{"weight": 1.0}] + params
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(name, xs, base, params, seed=3)
        torch.set_num_threads(3)
        three = run(name, xs, base, params, seed=3)
        assert torch.get_num_threads() == 3  # restored after the parallel section
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(three, one, rtol=0, atol=0)


def test_della_draws_by_rank_from_the_seed_alone():
    """DELLA's mask is a function of (seed, model) and the deltas' ranks: the same on every
    call, another for another seed, kept at density on average and more often where the
    change is larger; a density -/+ epsilon outside (0, 1) is refused with the fix."""
    base = randn(64, 512, seed=1)
    tensors = [base + 0.1 * randn(64, 512, seed=2)]
    params = {"rescale": "none"}
    mp = [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}]
    one, again, other = (run("della_linear", tensors, base, mp, params, seed=s) for s in (3, 3, 4))
    assert torch.equal(one, again) and not torch.equal(one, other)
    kept = one != base
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    rank = (tensors[0] - base).abs().argsort(dim=1).argsort(dim=1)
    low, high = float(kept[rank < 512 // 4].float().mean()), float(kept[rank >= 3 * 512 // 4].float().mean())
    assert abs(low - 0.25) < 0.02 and abs(high - 0.55) < 0.02, (low, high)  # 0.2 + 0.4 * 1/8, 0.2 + 0.4 * 7/8
    with pytest.raises(UserError, match="epsilon"):
        run("della", tensors, base, [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}])


# --- parameters and errors --------------------------------------------------------------


def test_defaults_follow_mergekit_presets():
    defaults = {
        name: {spec.name: spec.default for spec in KERNELS[name].params if not spec.per_model}
        for name in TASK_VECTOR_KERNELS
    }
    assert defaults["ties"]["normalize"] is True and defaults["ties"]["rescale"] == "none"
    assert defaults["dare_ties"]["normalize"] is False and defaults["dare_ties"]["rescale"] == "l1"
    assert defaults["dare_linear"]["rescale"] == "l1"
    assert defaults["task_arithmetic"]["normalize"] is False and "rescale" not in defaults["task_arithmetic"]
    assert all(d["lambda"] == 1.0 for d in defaults.values())
    assert KERNELS["linear"].params[1].default is True and not KERNELS["linear"].uses_base
    assert [name for name, k in KERNELS.items() if k.random] == ["dare_linear", "dare_ties", "della", "della_linear"]
    della = {name: {spec.name: spec.default for spec in KERNELS[name].params} for name in ("della", "della_linear")}
    assert della["della"]["normalize"] is True and della["della_linear"]["normalize"] is False
    assert della["della"]["rescale"] == della["della_linear"]["rescale"] == "l1" and della["della"]["epsilon"] == 0.15
    assert [name for name, k in KERNELS.items() if k.optional_base] == ["nuslerp", "multislerp"]
    for kernel in KERNELS.values():
        for spec in kernel.params:
            # RAM's epsilon only says what counts as changed (1e-5): a tolerance, not a strength
            strength = spec.name in {"weight", "density", "t", "lambda", "gamma", "alpha", "epsilon", "select_topk", "r"}
            assert spec.tunable == (strength and not (kernel.name.startswith("ram") and spec.name == "epsilon"))
            assert not spec.tunable or spec.low < spec.high


def test_global_value_of_a_per_model_parameter_applies_to_every_model():
    filled_models, filled = with_defaults(get_kernel("ties"), [{"weight": 1.0}, {"weight": 2, "density": 0.3}],
                                          {"density": 0.5, "rescale": True})
    assert [mp["density"] for mp in filled_models] == [0.5, 0.3]
    assert filled == {"lambda": 1.0, "normalize": True, "rescale": "l1", "int8_mask": False}


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_range_is_a_user_error(density):
    with pytest.raises(UserError, match=r"'density' for model 0 must be in \(0, 1\]"):
        run("ties", [randn(3)], randn(3), [{"weight": 1.0, "density": density}])


def test_bad_parameters_are_user_errors():
    x = randn(3)
    with pytest.raises(UserError, match="'weight' for model 1 is required"):
        run("ties", [x, x], x, [{"weight": 1.0}, {"density": 0.5}])
    with pytest.raises(UserError, match="'t' is required"):
        run("slerp", [x], x, [{}], {})
    with pytest.raises(UserError, match="did you mean 'density'"):
        run("ties", [x], x, [{"weight": 1.0, "densty": 0.5}])
    with pytest.raises(UserError, match="applies to the whole merge"):
        run("ties", [x], x, [{"weight": 1.0, "normalize": False}])
    with pytest.raises(UserError, match="must be one of l1"):
        run("dare_ties", [x], x, [{"weight": 1.0}], {"rescale": "l2"})
    with pytest.raises(UserError, match="must be a number"):
        run("linear", [x], None, [{"weight": "heavy"}])
    with pytest.raises(UserError, match="needs a base model"):
        run("ties", [x], None, [{"weight": 1.0}])
    with pytest.raises(UserError, match="different shapes"):
        run("linear", [x, randn(4)], None, [{"weight": 1.0}, {"weight": 1.0}])
    with pytest.raises(UserError, match="sum to zero"):
        run("linear", [x, x], None, [{"weight": 1.0}, {"weight": -1.0}])


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'ties'"):
        get_kernel("tie")


@pytest.mark.parametrize("name, module, params", [
    ("sce", "sce", {"select_topk": 0.5}), ("sce", "sce", {}), ("ram", "ram", {"epsilon": 0.05}),
    ("ramplus_tl", "ram", {"epsilon": 0.05, "r": 0.3, "alpha": 0.5}), ("nearswap", "nearswap", {"t": 0.05})])
def test_chunked_kernels_do_not_depend_on_chunks_or_threads(name, module, params, monkeypatch):
    """sce, ram and nearswap run in cache-sized chunks on all threads; their result is the one
    whole-tensor pass gives (the form the mergekit parity cases check), bit for bit."""
    import importlib

    mod = importlib.import_module(f"evomerge.merge.{module}")
    base = randn(300, 700, seed=1)
    tensors = [base + 0.1 * randn(300, 700, seed=2 + i) for i in range(1 if name == "nearswap" else 3)]
    chunked = run(name, tensors, base, [{}] * len(tensors), params)
    monkeypatch.setattr(mod, "_STEP", 1 << 30)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = run(name, tensors, base, [{}] * len(tensors), params)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(chunked, whole)


def test_population_variance_is_torch_var_bit_for_bit():
    from evomerge.merge.sce import population_variance

    for n in (2, 3, 5):
        rows = torch.stack([0.01 * randn(200_003, seed=i) for i in range(n)])
        assert torch.equal(population_variance(rows), torch.var(rows, dim=0, unbiased=False))
        half = rows.bfloat16().float()  # few distinct values, as in bf16 fine-tunes
        assert torch.equal(population_variance(half), torch.var(half, dim=0, unbiased=False))
