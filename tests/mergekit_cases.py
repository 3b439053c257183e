"""The parity tier's models and cases (tests/test_mergekit.py): recipes by name, built
from the models' paths, each run through mergekit 0.1.5 and `evomerge merge`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import make_model

ARCHS = ("llama", "qwen2", "gpt2")


# --- models ---------------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    save_file({n: t.contiguous() for n, t in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text()) | config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _retied(src: Path, dst: Path, tied: bool, head_noise: float, seed: int) -> Path:
    """``src`` with its head tied (no lm_head.weight) or untied (lm_head = its embeddings
    plus noise: a fine-tune whose head moved on its own)."""
    w = load_file(src / "model.safetensors")
    emb = next(n for n in w if n.endswith(("embed_tokens.weight", "wte.weight")))
    if tied:
        w.pop("lm_head.weight", None)
    elif "lm_head.weight" not in w:
        noise = torch.randn(w[emb].shape, generator=torch.Generator().manual_seed(seed))
        w["lm_head.weight"] = w[emb] + head_noise * noise
    return _rewrite(src, dst, w, tie_word_embeddings=tied)


def _realistic(root: Path) -> dict[str, Path]:
    """A bf16 Llama family at real models' scales: weights and embeddings of std 0.02,
    norms near 1, fine-tunes 0.002 away. Their deltas are a few bf16 steps of the weights,
    so bf16 rounding, cancellations and ties are as common as in real merges."""
    template = make_model(root / "real_template", "llama", seed=100)
    gen = torch.Generator().manual_seed(7)
    base = {n: (1 + 0.02 * torch.randn(t.shape, generator=gen)) if "norm" in n else 0.02 * torch.randn(t.shape, generator=gen)
            for n, t in load_file(template / "model.safetensors").items()}
    out = {}
    for name in ("base", "ft0", "ft1"):
        tensors = base if name == "base" else {n: t + 0.002 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        out[f"real/{name}"] = _rewrite(template, root / f"real_{name}", {n: t.bfloat16() for n, t in tensors.items()},
                                       dtype="bfloat16")
    return out


def _slerp_edges(base: Path, dst: Path) -> Path:
    """``base`` with tensors that take slerp's special branches: parallel (3x), antipodal,
    zero (a norm below 1e-8 counts as 1), nearly parallel (cos just above 0.9995) and just
    below the lerp threshold."""
    w = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    attn = "model.layers.{}.self_attn.{}_proj.weight"
    w[attn.format(0, "q")] = 3 * w[attn.format(0, "q")]
    w[attn.format(0, "k")] = -w[attn.format(0, "k")]
    w[attn.format(0, "v")] = torch.zeros_like(w[attn.format(0, "v")])
    for layer, noise in ((1, 0.004), (2, 0.008)):  # cos ~ 0.9998 and ~ 0.9992 against std 0.2 weights
        for kind in ("q", "k"):
            x = w[attn.format(layer, kind)]
            w[attn.format(layer, kind)] = x + noise * torch.randn(x.shape, generator=gen)
    return _rewrite(base, dst, w)


def build_models(family: dict, root: Path) -> dict[str, Path]:
    """'{arch}/{base,a,b,c}' (float32, from conftest's family plus a third fine-tune),
    '{arch}/{base,a,b}_{tied,untied}' for llama and qwen2, 'real/{base,ft0,ft1}', and
    'llama/edges' for slerp's special cases."""
    m = {}
    for i, arch in enumerate(ARCHS):
        m.update({f"{arch}/{k}": family[arch][k] for k in ("base", "a", "b")})
        m[f"{arch}/c"] = make_model(root / f"{arch}_c", arch, seed=10 * i + 3, base=family[arch]["base"])
    for arch in ("llama", "qwen2"):
        for j, k in enumerate(("base", "a", "b")):
            m[f"{arch}/{k}_tied"] = _retied(m[f"{arch}/{k}"], root / f"{arch}_{k}_tied", True, 0.0, j)
            m[f"{arch}/{k}_untied"] = _retied(m[f"{arch}/{k}"], root / f"{arch}_{k}_untied", False, 0.02 if j else 0.0, j)
    m.update(_realistic(root))
    m["llama/edges"] = _slerp_edges(m["llama/base"], root / "llama_edges")
    m["llama/lora"] = _lora_adapter(m["llama/base"], root / "llama_lora", rank=4, alpha=8, rslora=False)
    m["llama/lora_rs"] = _lora_adapter(m["llama/base"], root / "llama_lora_rs", rank=8, alpha=4, rslora=True)
    for k, template in (("base", CHAT_A), ("a", CHAT_B), ("b", CHAT_B)):
        m[f"llama/{k}_chat"] = _with_chat_template(m[f"llama/{k}"], root / f"llama_{k}_chat", template)
    # (not qwen2: transformers 5 reads these fixtures' tokenizer as Qwen2Tokenizer, which adds
    # <|endoftext|> past the 48 rows, a checkpoint every tokenizer choice refuses)
    for key in ("llama/a", "gpt2/a", "llama/a_tied"):
        m[f"{key}_added"] = _with_added_tokens(m[key], root / f"{key.replace('/', '_')}_added", CHAT_TOKENS, seed=11)
    m["llama/b_added"] = _with_added_tokens(m["llama/b"], root / "llama_b_added", ["<|im_start|>", "<tool>"], seed=12,
                                            extra_rows=5)
    return m


CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def _with_added_tokens(src: Path, dst: Path, tokens: list[str], seed: int, extra_rows: int = 0) -> Path:
    """``src`` as a fine-tune that added special tokens to its tokenizer (a chat template's,
    as real fine-tunes do): one more embedding (and untied head) row each, learnt (random
    here), plus ``extra_rows`` rows no token uses (a vocab_size rounded up)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(tokens, special_tokens=True)
    rows = len(tok) + extra_rows
    w = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, t in list(w.items()):
        if name.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight")):
            w[name] = torch.cat([t, torch.randn(rows - t.shape[0], t.shape[1], generator=gen).to(t.dtype)])
    out = _rewrite(src, dst, w, vocab_size=rows)
    tok.save_pretrained(out)
    return out


CHAT_A = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
CHAT_B = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}\n"
CHAT_GIVEN = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"


def _lora_adapter(base: Path, dst: Path, rank: int, alpha: float, rslora: bool) -> Path:
    """A PEFT LoRA adapter of ``base`` (q, v and down projections of every layer), written as
    peft writes one: adapter_config.json and adapter_model.safetensors."""
    w = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(rank)
    factors = {}
    for name, t in w.items():
        if name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            module = "base_model.model." + name.removesuffix(".weight")
            factors[module + ".lora_A.weight"] = 0.1 * torch.randn(rank, t.shape[1], generator=gen)
            factors[module + ".lora_B.weight"] = 0.1 * torch.randn(t.shape[0], rank, generator=gen)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    save_file(factors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
              "lora_alpha": alpha, "use_rslora": rslora, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
              "init_lora_weights": True, "inference_mode": True}
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dst


def _with_chat_template(src: Path, dst: Path, template: str) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst



# --- cases: name -> recipe, built from the models' paths -------------------------------


def _src(m, key, params=None, layer_range=None):
    src = {"model": str(m[key])}
    if layer_range is not None:
        src["layer_range"] = list(layer_range)
    if params:
        src["parameters"] = params
    return src


def exact_cases(m, arch) -> dict[str, dict]:
    """float32 recipes over fp32 models: every method both tools have, gradients, filters,
    slices, lambda, normalize on and off, rescale."""
    k = lambda name: f"{arch}/{name}"  # noqa: E731
    base = str(m[k("base")])
    tv = lambda method, sources, **top: {"merge_method": method, "base_model": base,  # noqa: E731
                                         "models": [_src(m, k(s), p) for s, p in sources], "dtype": "float32", **top}
    # filters that name the architecture's attention and MLP blocks
    attn, mlp = ("self_attn", "mlp") if arch != "gpt2" else ("attn", "mlp")
    cases = {
        "linear": {"merge_method": "linear", "models": [_src(m, k("a"), {"weight": 0.3}), _src(m, k("b"), {"weight": 0.45})],
                   "dtype": "float32"},
        "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False}, "dtype": "float32",
                                "models": [_src(m, k("a"), {"weight": 0.3}), _src(m, k("b"), {"weight": 0.45})]},
        "linear_three": {"merge_method": "linear", "dtype": "float32", "models": [
            _src(m, k("a"), {"weight": 0.3}), _src(m, k("b"), {"weight": 0.45}), _src(m, k("base"), {"weight": 0.17})]},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [_src(m, k("base")), _src(m, k("a"))],
                  "parameters": {"t": 0.3}, "dtype": "float32"},
        # t per block kind, each a gradient over the layers; the catch-all covers norms and embeddings
        "slerp_filtered_gradients": {"merge_method": "slerp", "base_model": str(m[k("a")]), "dtype": "float32",
                                     "models": [_src(m, k("a")), _src(m, k("b"))], "parameters": {"t": [
                                         {"filter": attn, "value": [0, 0.5, 1]}, {"filter": mlp, "value": [1, 0.5, 0]},
                                         {"value": 0.5}]}},
        "task_arithmetic": tv("task_arithmetic", [("a", {"weight": 0.7}), ("b", {"weight": 0.4})], parameters={"lambda": 1.3}),
        # a gradient's first value applies to the final norm and the head (mergekit's t = 0 after the blocks)
        "task_arithmetic_gradient": tv("task_arithmetic", [("a", {"weight": [1.0, 0.0]}), ("b", {"weight": 0.5})]),
        "task_arithmetic_normalized": tv("task_arithmetic", [("a", {"weight": 0.7}), ("b", {"weight": 0.4})],
                                         parameters={"normalize": True, "lambda": 0.9}),
        # density 0.02 keeps int(0.64) = 0 of a 32-entry norm: mergekit keeps one
        "ties": tv("ties", [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": 0.4, "density": 0.02})],
                   parameters={"lambda": 1.7}),
        "ties_negative_weight": tv("ties", [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": -0.3, "density": 0.6})]),
        "ties_equal_weights": tv("ties", [("a", {"weight": 0.5, "density": 0.4}), ("b", {"weight": 0.5, "density": 0.6})]),
        "ties_unnormalized": tv("ties", [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": 0.5, "density": 0.6})],
                                parameters={"normalize": False}),
        "ties_three": tv("ties", [("a", {"weight": 0.3, "density": 0.7}), ("b", {"weight": 0.45, "density": 0.5}),
                                  ("c", {"weight": 0.2, "density": 0.3})]),
        "ties_rescaled": tv("ties", [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": 0.4, "density": 0.6})],
                            parameters={"rescale": True}),
        "dare_linear_density_1": tv("dare_linear", [("a", {"weight": 0.7, "density": 1.0}), ("b", {"weight": 0.4})]),
        "dare_ties_density_1": tv("dare_ties", [("a", {"weight": 0.7}), ("b", {"weight": 0.4}), ("c", {"weight": -0.2})],
                                  parameters={"normalize": True}),
        "breadcrumbs": tv("breadcrumbs", [("a", {"weight": 0.7, "density": 0.5, "gamma": 0.05}),
                                          ("b", {"weight": 0.4, "density": 0.8})]),
        "breadcrumbs_ties": tv("breadcrumbs_ties", [("a", {"weight": 0.7, "density": 0.5, "gamma": 0.05}),
                                                    ("b", {"weight": 0.4, "density": 0.8, "gamma": 0.3})]),
        # gradients on density and lambda, a lone {filter, value}, '*', a global per-model weight
        "ties_gradients": tv("ties", [("a", {"weight": 0.6, "density": [0.2, 0.9]}),
                                      ("b", {"weight": {"filter": mlp, "value": 0.8},
                                             "density": [{"filter": attn, "value": 0.3}, {"filter": "*", "value": [0.9, 0.5]}]})],
                             parameters={"lambda": [1.5, 0.5], "weight": 0.25, "normalize": False}),
        "breadcrumbs_gradients": tv("breadcrumbs_ties", [("a", {"weight": 0.6, "density": [0.5, 0.9], "gamma": [0.0, 0.2]}),
                                                         ("b", {"weight": 0.4, "density": 0.7})], parameters={"gamma": 0.05}),
        # mergekit's newer methods: Model Stock (per tensor and per row), Karcher mean, NearSwap
        "model_stock": tv("model_stock", [("a", None), ("b", None), ("c", None)]),
        "model_stock_filter_wise": tv("model_stock", [("a", None), ("b", None)], parameters={"filter_wise": True}),
        "karcher": {"merge_method": "karcher", "dtype": "float32", "models": [_src(m, k(s)) for s in ("a", "b", "c")]},
        "karcher_few_steps": {"merge_method": "karcher", "dtype": "float32", "parameters": {"max_iter": 2, "tol": 1e-7},
                              "models": [_src(m, k(s)) for s in ("a", "base")]},
        "nearswap": tv("nearswap", [("a", None)], parameters={"t": 0.01}),
        # DELLA at density 1 draws nothing: TIES' election and averaging, or a plain sum
        "della_density_1": tv("della", [("a", {"weight": 0.7}), ("b", {"weight": 0.4}), ("c", {"weight": -0.2})]),
        "della_linear_density_1": tv("della_linear", [("a", {"weight": 0.7, "density": 1.0}), ("b", {"weight": 0.4})],
                                     parameters={"lambda": 1.2}),
        "sce": tv("sce", [("a", None), ("b", None), ("c", None)]),
        "sce_select_topk": tv("sce", [("a", None), ("b", None), ("c", None)], parameters={"select_topk": 0.4}),
        "nuslerp": {"merge_method": "nuslerp", "dtype": "float32",
                    "models": [_src(m, k("a"), {"weight": 0.3}), _src(m, k("b"), {"weight": 0.7})]},
        "nuslerp_task_vectors_row_wise": tv("nuslerp", [("a", {"weight": 1.0}), ("b", {"weight": 3.0})],
                                            parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        "nuslerp_task_vectors_per_row": tv("nuslerp", [("a", {"weight": 0.6}), ("b", {"weight": 0.2})],
                                           parameters={"nuslerp_flatten": False}),
        "multislerp": {"merge_method": "multislerp", "dtype": "float32", "models": [
            _src(m, k("a"), {"weight": 0.2}), _src(m, k("b"), {"weight": 0.5}), _src(m, k("c"), {"weight": 0.3})]},
        "multislerp_task_vectors": tv("multislerp", [("a", {"weight": 1.0}), ("b", {"weight": 2.0})]),
        "arcee_fusion": tv("arcee_fusion", [("a", None)]),
        "ram": tv("ram", [("a", None), ("b", None), ("c", None)]),
        # epsilon near the deltas' median magnitude: entries changed by one, several or no model
        "ram_epsilon": tv("ram", [("a", None), ("b", None), ("c", None)], parameters={"epsilon": 0.02}),
        "ramplus_tl": tv("ramplus_tl", [("a", None), ("b", None), ("c", None)],
                         parameters={"epsilon": 0.02, "r": 0.3, "alpha": 0.5}),
        # layer stacking; scale filters see the *input* names: 'layers.1.' is the second
        # slice's first output layer (2), not output layer 1
        "passthrough_stack": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [_src(m, k("a"), layer_range=(0, 2))]},
            {"sources": [_src(m, k("b"), {"scale": [{"filter": "layers.1.", "value": 0.5}, {"filter": "o_proj", "value": 0.0},
                                                   {"filter": "c_proj", "value": 0.0}, {"value": 1.0}]}, layer_range=(1, 3))]}]},
        # per-slice parameters; b's layers are offset, so its 'layers.1.' filter (input name)
        # hits output layer 0 while the slice's lambda filter (output name) hits output layer 1
        "slices_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                                   "parameters": {"lambda": 7.0}, "slices": [
            {"sources": [_src(m, k("base"), layer_range=(0, 2)), _src(m, k("a"), {"weight": [0.2, 0.8]}, (0, 2)),
                         _src(m, k("b"), {"weight": [{"filter": "layers.1.", "value": 2.0}, {"value": 0.5}]}, (1, 3))],
             "parameters": {"lambda": [{"filter": "layers.1.", "value": 0.5}, {"value": 1.0}]}},
            {"sources": [_src(m, k("base"), layer_range=(2, 3)), _src(m, k("a"), {"weight": [0.9, 0.1]}, (2, 3)),
                         _src(m, k("b"), {"weight": 0.3}, (0, 1))], "parameters": {"lambda": 1.2}}]},
        "slices_slerp": {"merge_method": "slerp", "base_model": str(m[k("a")]), "dtype": "float32", "slices": [
            {"sources": [_src(m, k("a"), layer_range=(0, 3)), _src(m, k("b"), layer_range=(0, 3))], "parameters": {"t": [0.0, 1.0]}},
            {"sources": [_src(m, k("a"), layer_range=(1, 2)), _src(m, k("b"), layer_range=(2, 3))], "parameters": {"t": [0.2, 0.4]}}]},
    }
    if arch == "llama":
        edges = [_src(m, k("base")), _src(m, k("edges"))]
        cases["slerp_edge_cases"] = {"merge_method": "slerp", "base_model": base, "models": edges,
                                     "parameters": {"t": [-0.2, 1.2]}, "dtype": "float32"}  # and extrapolation
        cases["slerp_edge_cases_as_base"] = {"merge_method": "slerp", "base_model": str(m[k("edges")]), "models": edges,
                                             "parameters": {"t": 0.3}, "dtype": "float32"}
    if arch == "qwen2":
        # mergekit 0.1.5 cannot write a qwen2 of another depth: it copies the base's config,
        # whose 3-entry layer_types transformers 5 refuses for 4 layers (evomerge rewrites it)
        del cases["passthrough_stack"], cases["slices_slerp"]
    return cases


def tied_case(m, arch, base_tied, sources_tied, method) -> dict:
    tie = lambda tied: "tied" if tied else "untied"  # noqa: E731
    base = str(m[f"{arch}/base_{tie(base_tied)}"])
    a, b = (str(m[f"{arch}/{s}_{tie(sources_tied)}"]) for s in ("a", "b"))
    if method == "linear":  # the base among the models, so both tools take its config
        return {"merge_method": "linear", "base_model": base, "dtype": "float32", "models": [
            {"model": base, "parameters": {"weight": 0.2}}, {"model": a, "parameters": {"weight": 0.5}},
            {"model": b, "parameters": {"weight": 0.3}}]}
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
            "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}}]}


TIED = [(arch, bt, st, method) for arch in ("llama", "qwen2") for bt in (True, False) for st in (True, False)
        for method in ("linear", "task_arithmetic")]


def tied_name(arch, bt, st, method):
    return f"tied-{arch}-base_{'tied' if bt else 'untied'}-sources_{'tied' if st else 'untied'}-{method}"


def bf16_exact_cases(m) -> dict[str, dict]:
    """Cases where both tools round once to bf16 from the same float32 arithmetic: linear and
    slerp compute in float32 in mergekit too, and passthrough's bf16 product is rounded once."""
    r = lambda key: str(m[key])  # noqa: E731
    two = [{"model": r("real/ft0"), "parameters": {"weight": 0.3}}, {"model": r("real/ft1"), "parameters": {"weight": 0.45}}]
    fp32_two = [{"model": r("llama/a"), "parameters": {"weight": 0.3}}, {"model": r("llama/b"), "parameters": {"weight": 0.45}}]
    return {
        "linear_bf16": {"merge_method": "linear", "models": two, "dtype": "bfloat16"},
        "linear_no_dtype": {"merge_method": "linear", "models": two},  # bf16 models: written as bf16
        "slerp_bf16": {"merge_method": "slerp", "base_model": r("real/base"), "dtype": "bfloat16",
                       "models": [{"model": r("real/base")}, {"model": r("real/ft0")}], "parameters": {"t": 0.3}},
        "passthrough_bf16": {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": r("real/ft0"), "layer_range": [0, 2], "parameters": {"scale": 0.7}}]},
            {"sources": [{"model": r("real/ft1"), "layer_range": [1, 3]}]}]},
        # float32 models loaded as bf16 (mergekit's `dtype` is the dtype inputs are read in)
        "linear_fp32_models_bf16": {"merge_method": "linear", "models": fp32_two, "dtype": "bfloat16"},
        # ... and the result passes through bf16 on its way to out_dtype float32
        "slerp_fp32_models_bf16_out_fp32": {"merge_method": "slerp", "base_model": r("llama/base"), "dtype": "bfloat16",
                                            "out_dtype": "float32", "parameters": {"t": 0.3},
                                            "models": [{"model": r("llama/base")}, {"model": r("llama/a")}]},
        "linear_fp32_out_bf16": {"merge_method": "linear", "models": fp32_two, "dtype": "float32", "out_dtype": "bfloat16"},
    }


# name -> (recipe builder, source keys, weights, lambda, divisor rule, densities or None, consensus)
def bf16_bounded_cases(m) -> dict[str, tuple]:
    r = lambda key: str(m[key])  # noqa: E731
    tv = lambda method, base, srcs, **top: {"merge_method": method, "base_model": r(base),  # noqa: E731
                                            "models": [{"model": r(s), "parameters": p} for s, p in srcs], **top}
    real = ("real/base", "real/ft0", "real/ft1")
    fp32 = ("llama/base", "llama/a", "llama/b")
    return {
        "task_arithmetic_bf16": (tv("task_arithmetic", real[0], [(real[1], {"weight": 0.7}), (real[2], {"weight": 0.4})],
                                    parameters={"lambda": 1.3}, dtype="bfloat16"), real, (0.7, 0.4), 1.3, 1.0, None, False),
        "task_arithmetic_bf16_out_fp32": (tv("task_arithmetic", real[0], [(real[1], {"weight": 0.7}), (real[2], {"weight": 0.4})],
                                             dtype="bfloat16", out_dtype="float32"), real, (0.7, 0.4), 1.0, 1.0, None, False),
        "task_arithmetic_fp32_models_bf16": (tv("task_arithmetic", fp32[0], [(fp32[1], {"weight": 0.7}), (fp32[2], {"weight": 0.4})],
                                                dtype="bfloat16"), fp32, (0.7, 0.4), 1.0, 1.0, None, False),
        "ties_bf16_density_1": (tv("ties", real[0], [(real[1], {"weight": 0.7}), (real[2], {"weight": 0.4})], dtype="bfloat16"),
                                real, (0.7, 0.4), 1.0, 0.4, None, True),
        # no dtype: bf16 models, so mergekit computes in bf16 and writes bf16
        "ties_no_dtype": (tv("ties", real[0], [(real[1], {"weight": 0.7, "density": 0.4}), (real[2], {"weight": 0.4, "density": 0.6})]),
                          real, (0.7, 0.4), 1.0, 0.4, (0.4, 0.6), True),
    }


def dare_cases(m) -> dict[str, tuple]:
    """name -> (recipe, effective weight, density, L1 rescale?): one fine-tune, so each output
    entry is base + weight * scale * delta where kept and the base where dropped."""
    def dare(method, density, **params):
        return {"merge_method": method, "base_model": str(m["llama/base"]), "dtype": "float32", "parameters": params,
                "models": [{"model": str(m["llama/a"]), "parameters": {"weight": 0.8, "density": density}}]}
    return {
        "della_linear": (dare("della_linear", 0.4, epsilon=0.2), 0.8, 0.4, True),
        "della_linear_no_rescale": (dare("della_linear", 0.4, epsilon=0.2, rescale=False), 0.8, 0.4, False),
        # della normalizes: one model's weight divides out
        "della": (dare("della", 0.5), 1.0, 0.5, True),
        "dare_linear": (dare("dare_linear", 0.3), 0.8, 0.3, True),
        "dare_linear_no_rescale": (dare("dare_linear", 0.3, rescale=False), 0.8, 0.3, False),
        "dare_ties": (dare("dare_ties", 0.6), 0.8, 0.6, True),
    }


def trim_tie_cases(m) -> dict[str, tuple]:
    """name -> (recipe, density, gamma or None): one bf16 fine-tune computed in float32, whose
    |delta| takes few distinct values, so a trim threshold is shared by many entries."""
    def trim(method, **params):
        return {"merge_method": method, "base_model": str(m["real/base"]), "dtype": "float32",
                "models": [{"model": str(m["real/ft0"]), "parameters": {"weight": 1.0, **params}}]}
    return {"ties_at_threshold": (trim("ties", density=0.3), 0.3, None),
            "breadcrumbs_at_threshold": (trim("breadcrumbs", density=0.5, gamma=0.1), 0.5, 0.1)}


def chat_template_cases(m) -> dict[str, tuple[dict, str]]:
    """name -> (recipe, the template the output's tokenizer must have): mergekit applies a
    chat template only when it builds a tokenizer, so these name a tokenizer_source."""
    def linear(**top):
        return {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base", "base_model": str(m["llama/base_chat"]),
                "models": [_src(m, f"llama/{k}_chat", {"weight": 0.5}) for k in ("base", "a", "b")], **top}
    return {"chat_template_auto": (linear(chat_template="auto"), CHAT_B.strip()),
            "chat_template_text": (linear(chat_template=CHAT_GIVEN), CHAT_GIVEN)}


CHAT_NAMES = ("chatml", "llama3", "alpaca", "mistral", "exaone")


def named_chat_template_cases(m) -> dict[str, dict]:
    """mergekit's named formats, each written into a merge's tokenizer."""
    return {f"chat_template_{name}": {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "base",
                                      "models": [_src(m, "llama/a", {"weight": 0.5}), _src(m, "llama/b", {"weight": 0.5})],
                                      "chat_template": name} for name in CHAT_NAMES}


# conversations the named formats render: with and without a system turn, multi-turn, a
# trailing newline, alpaca's user_context, a conversation mistral refuses (two user turns)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": " What is 2+2? "}, {"role": "assistant", "content": "4 "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\n"}],
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "u"}, {"role": "user_context", "content": "ctx"},
     {"role": "assistant", "content": "r"}, {"role": "system", "content": "s2"}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "second"}],
    [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
]


def tokenizer_cases(m) -> dict[str, dict]:
    """A tokenizer choice over models that share one vocabulary: mergekit builds the output
    tokenizer and re-indexes the rows to it (the identity here), evomerge copies it."""
    a, b = (str(m[f"llama/{k}"]) for k in ("a", "b"))
    two = [_src(m, "llama/a", {"weight": 0.3}), _src(m, "llama/b", {"weight": 0.7})]
    tv = [_src(m, "llama/a", {"weight": 0.7, "density": 0.5}), _src(m, "llama/b", {"weight": 0.4, "density": 0.6})]
    return {
        "tokenizer_source_union": {"merge_method": "linear", "dtype": "float32", "models": two, "tokenizer_source": "union"},
        "tokenizer_union_padded": {"merge_method": "ties", "base_model": str(m["llama/base"]), "dtype": "float32", "models": tv,
                                   "tokenizer": {"source": "union", "pad_to_multiple_of": 16}},
        "tokenizer_model": {"merge_method": "linear", "dtype": "float32", "models": two, "tokenizer": {"source": b}},
        "tokenizer_base_slices": {"merge_method": "slerp", "base_model": a, "dtype": "float32", "parameters": {"t": 0.4},
                                  "tokenizer": {"source": "base"}, "slices": [{"sources": [
                                      {"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [0, 3]}],
                                      "residual_weight": 0.5}]},
    }


def vocab_cases(m) -> dict[str, dict]:
    """Differing vocabularies: llama/a_added has two special tokens more (<|im_start|>,
    <|im_end|>), llama/b_added <|im_start|> and <tool> and 5 unused rows; every tokenizer
    choice re-indexes the rows. Each token's row is compared by the token, not its id."""
    base, b = str(m["llama/base"]), str(m["llama/b"])
    a_add, b_add = str(m["llama/a_added"]), str(m["llama/b_added"])
    tv = lambda *ws: [{"model": k, "parameters": {"weight": w, "density": 0.6}} for k, w in ws]  # noqa: E731
    lin = lambda *ws: [{"model": k, "parameters": {"weight": w}} for k, w in ws]  # noqa: E731
    return {
        "vocab_union_linear": {"merge_method": "linear", "dtype": "float32", "models": lin((b, 0.3), (a_add, 0.7)),
                               "tokenizer": {"source": "union"}},
        "vocab_union_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                                        "models": lin((a_add, 0.6), (b_add, 0.5)), "tokenizer_source": "union"},
        "vocab_base_ties": {"merge_method": "ties", "base_model": base, "dtype": "float32",
                            "models": tv((a_add, 0.7), (b_add, 0.4)), "tokenizer": {"source": "base"}},
        "vocab_model_slerp": {"merge_method": "slerp", "base_model": base, "dtype": "float32", "parameters": {"t": 0.3},
                              "slices": [{"sources": [{"model": base, "layer_range": [0, 3]},
                                                      {"model": a_add, "layer_range": [0, 3]}]}],
                              "tokenizer": {"source": a_add}},
        "vocab_tokens": {"merge_method": "linear", "dtype": "float32", "models": lin((a_add, 0.5), (b_add, 0.25), (base, 0.25)),
                         "base_model": base, "tokenizer": {"source": "union", "tokens": {
                             "<|im_start|>": {"source": {"kind": "model_token", "model": base, "token": "t1"}},
                             "t2": {"source": {"kind": "zero"}, "force": True},
                             "<new>": {"source": {"kind": "model_token", "model": b_add, "token_id": 3}},
                             "<|im_end|>": {"source": a_add, "force": True}}}},
        # padding rows repeat one mean row, so a magnitude trim meets ties at its threshold, which
        # mergekit's sort and evomerge's threshold break differently (test_trim_ties_*): no trim here
        "vocab_padded": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                         "models": lin((a_add, 0.8), (b, 0.5)),
                         "tokenizer": {"source": "union", "pad_to_multiple_of": 16}},
        "vocab_tied": {"merge_method": "task_arithmetic", "base_model": str(m["llama/base_tied"]), "dtype": "float32",
                       "models": lin((str(m["llama/a_tied_added"]), 0.7), (str(m["llama/b_tied"]), 0.4)),
                       "tokenizer": {"source": "union"}},
        "vocab_gpt2": {"merge_method": "ties", "base_model": str(m["gpt2/base"]), "dtype": "float32",
                       "models": lin((str(m["gpt2/a_added"]), 0.9), (str(m["gpt2/b"]), 0.3)),
                       "tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
    }


def modules_cases(m) -> dict[str, dict]:
    """mergekit's modules: form, a decoder-only model's one module ("default"), with module-level
    parameters between the slice's (or per-model) and the recipe's."""
    base, a, b = (str(m[f"llama/{k}"]) for k in ("base", "a", "b"))
    return {
        "modules_models": {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                           "modules": {"default": {"models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b}],
                                                   "parameters": {"weight": [0.2, 0.9]}}}},
        "modules_slices": {"merge_method": "ties", "base_model": base, "dtype": "float32",
                           "modules": {"default": {"slices": [
                               {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2]},
                                            {"model": b, "layer_range": [1, 3]}], "parameters": {"density": 0.5}},
                               {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": a, "layer_range": [2, 3]},
                                            {"model": b, "layer_range": [0, 1]}]}],
                               "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.5}]}}}},
    }


def lora_cases(m) -> dict[str, dict]:
    """LoRA sources (MODEL+ADAPTER), merged in by mergekit through peft's merge_and_unload."""
    lora, lora_rs = (f"{m['llama/base']}+{m[k]}" for k in ("llama/lora", "llama/lora_rs"))
    return {
        "lora_linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": lora, "parameters": {"weight": 0.6}}, _src(m, "llama/a", {"weight": 0.4})]},
        "lora_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(m["llama/base"]), "dtype": "float32",
                                 "models": [{"model": lora_rs, "parameters": {"weight": 0.8}}, _src(m, "llama/a", {"weight": 0.5})]},
    }


def all_recipes(m) -> dict[str, dict]:
    recipes = {f"{arch}-{name}": r for arch in ARCHS for name, r in exact_cases(m, arch).items()}
    recipes |= {tied_name(*case): tied_case(m, *case) for case in TIED}
    recipes |= bf16_exact_cases(m)
    recipes |= {name: spec[0] for name, spec in bf16_bounded_cases(m).items()}
    recipes |= {name: spec[0] for name, spec in dare_cases(m).items()}
    recipes |= {name: spec[0] for name, spec in trim_tie_cases(m).items()}
    recipes |= {name: spec[0] for name, spec in chat_template_cases(m).items()}
    recipes |= named_chat_template_cases(m)
    recipes |= lora_cases(m)
    recipes |= tokenizer_cases(m)
    recipes |= vocab_cases(m)
    recipes |= modules_cases(m)
    return recipes


class AnyPath(dict):
    """Stands in for ``models`` when only the case names are wanted (at collection)."""

    def __missing__(self, key):
        return Path(key)


EXACT = [f"{arch}-{name}" for arch in ARCHS for name in exact_cases(AnyPath(), arch)]
