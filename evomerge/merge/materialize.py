"""Recipe -> plan -> tensors.

``plan()`` resolves a recipe against opened sources once: which inputs make
each output tensor, with every parameter already evaluated for that tensor
(gradients, filters, defaults) and every shape checked. ``compute()`` then
turns one planned tensor into numbers. Planning is where all bad input is
refused, so a merge that starts also finishes; computing is a pure function
of the plan and the source tensors, so the search and `evomerge merge` give
the same tensors for the same recipe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from ..errors import UserError, nearest
from ..io.layers import Architecture
from ..recipe import InputSlice, OutputSlice, Recipe, evaluate_setting
from .kernels import Kernel, get_kernel, with_defaults
from .expr import Expr, Merge, Output, Read, is_pre_tensor, layer_rests, numel
from .routing import route


class TensorSource(Protocol):
    """A model's tensors: a ModelDir on disk or a ResidentModel in memory."""

    path: Any
    config: dict
    arch: Architecture

    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class Plan:
    outputs: list[Output]
    config: dict  # config.json of the result
    tokenizer_source: str

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def peak_bytes(self, sources: Mapping[str, TensorSource]) -> int:
        """Working memory of the most expensive output tensor: its inputs as stored, then
        the larger of a float32 scratch (magnitude selection) and the float32 result with
        its cast to the output dtype; the kernels' chunk buffers are a few MB."""
        def cost(o: Output) -> int:
            reads = [o.expr] if isinstance(o.expr, Read) else [*o.expr.inputs, *filter(None, [o.expr.base])]
            n = numel(o.shape)
            stored = sum(n * sources[r.source].dtype(r.name).itemsize for r in reads)
            return stored + n * (4 + o.dtype.itemsize)
        return max((cost(o) for o in self.outputs), default=0)


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: the random kernels' masks depend on (seed, tensor), never on order or device."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plan(recipe: Recipe, sources: Mapping[str, TensorSource], seed: int | None = None) -> Plan:
    seed = recipe.seed if seed is None else seed
    _check_compatible(recipe, sources)
    out_dtype = _DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    outputs: list[Output] = []
    config: dict = {}
    if recipe.merge_method:
        outputs, config = _plan_ps(recipe, sources, seed, out_dtype)
    if recipe.routing:
        outputs, config = route(recipe, sources, outputs, config, out_dtype)
    if out_dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(out_dtype).removeprefix("torch.")
    tok = recipe.tokenizer_source or recipe.base_model or recipe.model_refs()[0]
    if tok in ("base", "union"):
        if tok == "union":
            raise UserError("tokenizer_source 'union' is not supported: merge models that share one tokenizer and name it (or 'base')")
        tok = recipe.base_model or recipe.model_refs()[0]
    if tok not in sources:
        raise UserError(f"tokenizer_source {tok!r} is not one of the recipe's models")
    return Plan(outputs, config, tok)


def _check_compatible(recipe: Recipe, sources: Mapping[str, TensorSource]) -> None:
    refs = recipe.model_refs()
    missing = [r for r in refs if r not in sources]
    if missing:
        raise RuntimeError(f"sources not opened: {missing}")
    first = sources[refs[0]]
    for r in refs[1:]:
        s = sources[r]
        if s.arch.model_type != first.arch.model_type:
            raise UserError(f"architectures differ: {refs[0]} is {first.arch.model_type!r}, {r} is {s.arch.model_type!r}; merge models of one family")
        if s.arch.vocab_size != first.arch.vocab_size:
            raise UserError(f"vocabulary sizes differ: {refs[0]} has {first.arch.vocab_size}, {r} has {s.arch.vocab_size}; merge models that share one tokenizer")
        if s.arch.layer_prefix != first.arch.layer_prefix:
            raise UserError(f"layer naming differs: {refs[0]} uses {first.arch.layer_prefix!r}, {r} uses {s.arch.layer_prefix!r}")


def _slices(recipe: Recipe, sources: Mapping[str, TensorSource], kernel: Kernel) -> list[OutputSlice]:
    if recipe.slices:
        return list(recipe.slices)
    models = list(recipe.models or [])
    ins = [InputSlice(model=m.model, layer_range=(0, sources[m.model].arch.num_layers), parameters=m.parameters) for m in models]
    if kernel.uses_base and recipe.base_model and recipe.base_model not in [m.model for m in models]:
        ins.append(InputSlice(model=recipe.base_model, layer_range=(0, sources[recipe.base_model].arch.num_layers)))
    return [OutputSlice(sources=ins)]


def _check_param_names(recipe: Recipe, kernel: Kernel, slices: list[OutputSlice]) -> None:
    """A misspelt parameter would silently fall back to its default: refuse it instead."""
    known = {p.name for p in kernel.params}
    scopes = [recipe.parameters] + [m.parameters for m in recipe.models or []]
    scopes += [s.parameters for s in slices] + [src.parameters for s in slices for src in s.sources]
    for scope in scopes:
        for name in scope or {}:
            if name not in known:
                raise UserError(f"{kernel.name} has no parameter {name!r}{nearest(name, known)}; its parameters: {', '.join(sorted(known))}")


def _plan_ps(recipe: Recipe, sources: Mapping[str, TensorSource], seed: int, out_dtype) -> tuple[list[Output], dict]:
    kernel = get_kernel(recipe.merge_method)
    slices = _slices(recipe, sources, kernel)
    _check_param_names(recipe, kernel, slices)
    for sl in slices:
        base = sl.base_model or recipe.base_model
        if kernel.uses_base and base is None:
            raise UserError(f"merge_method {kernel.name!r} needs a base_model")
        if kernel.uses_base and base not in [s.model for s in sl.sources]:
            raise UserError(f"merge_method {kernel.name!r}: the base_model {base!r} must be one of each slice's sources")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise UserError(f"all sources of a slice must span the same number of layers; got ranges {[list(s.layer_range) for s in sl.sources]}")
        for s in sl.sources:
            n = sources[s.model].arch.num_layers
            if s.layer_range[1] > n:
                raise UserError(f"layer_range {list(s.layer_range)} of {s.model} goes past its {n} layers (valid: 0..{n})")

    ref = sources[recipe.base_model or slices[0].sources[0].model]
    arch = ref.arch
    pre, post = [], []
    for name in list(ref.entries):
        if arch.split(name) is None:
            (pre if is_pre_tensor(name) else post).append(name)

    outputs: list[Output] = []

    def add(out_name: str, sl: OutputSlice, in_names: list[str], t: float) -> None:
        outputs.append(_plan_tensor(recipe, kernel, sl, out_name, in_names, t, sources, seed, out_dtype))

    for name in pre:
        add(name, slices[0], [name] * len(slices[0].sources), 0.0)
    layer = 0
    for sl in slices:
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            first = sl.sources[0]
            for rest in layer_rests(sources[first.model], first.layer_range[0] + idx):
                in_names = [sources[s.model].arch.layer_tensor(s.layer_range[0] + idx, rest) for s in sl.sources]
                add(arch.layer_tensor(layer, rest), sl, in_names, t)
            layer += 1
    for name in post:
        add(name, slices[-1], [name] * len(slices[-1].sources), 1.0)

    config = dict(ref.config)
    config[arch.layer_count_key] = layer
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == arch.num_layers and layer != arch.num_layers:
        config["layer_types"] = [t for sl in slices for i in range(*sl.sources[0].layer_range) for t in [types[i]]]
    return outputs, config


def _param_lookup(name: str, source: InputSlice | None, sl: OutputSlice, recipe: Recipe, tensor: str, t: float):
    """mergekit's lookup order: the slice source's own, the slice's, then the recipe's global parameters."""
    for scope in ((source.parameters if source else None), sl.parameters, recipe.parameters):
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor, t)
            if value is not None:
                return value
    return None


def _plan_tensor(recipe, kernel, sl, out_name, in_names, t, sources, seed, out_dtype) -> Output:
    base_ref = sl.base_model or recipe.base_model
    shapes = {}
    for s, n in zip(sl.sources, in_names):
        src = sources[s.model]
        if n not in src:
            raise UserError(f"{s.model} has no tensor {n!r} (needed for {out_name}); the models' layouts differ")
        shapes[s.model] = src.shape(n)
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{m} {list(v)}" for m, v in shapes.items())
        raise UserError(f"shape mismatch for {out_name}: {detail}; merge models of one architecture and size")
    first = sl.sources[0]
    src0 = sources[first.model]
    shape = src0.shape(in_names[0])
    dtype = out_dtype or src0.dtype(in_names[0])
    if not src0.dtype(in_names[0]).is_floating_point:
        return Output(out_name, shape, src0.dtype(in_names[0]), Read(first.model, in_names[0]))

    base = None
    inputs, model_params = [], []
    for s, n in zip(sl.sources, in_names):
        if kernel.uses_base and s.model == base_ref:
            base = Read(s.model, n)
            continue
        inputs.append(Read(s.model, n))
        model_params.append({p.name: v for p in kernel.params if p.per_model
                             if (v := _param_lookup(p.name, s, sl, recipe, n, t)) is not None})
    params = {p.name: v for p in kernel.params if not p.per_model
              if (v := _param_lookup(p.name, None, sl, recipe, out_name, t)) is not None}
    if not inputs:
        # only the base is given for this tensor: nothing to merge
        return Output(out_name, shape, dtype, base)
    try:
        model_params, params = with_defaults(kernel, model_params, params)
    except UserError as e:
        raise UserError(f"{out_name}: {e}") from None
    expr = Merge(kernel.name, tuple(inputs), base, tuple(model_params), params, tensor_seed(seed, out_name))
    return Output(out_name, shape, dtype, expr)


def compute(output: Output, get, device: str | torch.device = "cpu") -> torch.Tensor:
    """One planned tensor, in its output dtype. ``get(Read) -> Tensor`` supplies inputs."""
    t = evaluate(output.expr, get, device)
    if output.divide_by != 1.0:
        t = t / output.divide_by
    return t.to(output.dtype)


def evaluate(expr: Expr, get, device) -> torch.Tensor:
    if isinstance(expr, Read):
        x = get(expr).to(device)
        return x.float() if x.is_floating_point() else x
    kernel = get_kernel(expr.kernel)
    tensors = [get(r).to(device) for r in expr.inputs]
    base = get(expr.base).to(device) if expr.base is not None else None
    return kernel.fn(tensors, base, expr.model_params, expr.params, seed=expr.seed)
