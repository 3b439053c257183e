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

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import torch

from ..dtypes import DTYPES
from ..errors import UserError, nearest
from ..io.layers import Architecture
from ..recipe import MERGE_SOURCE, InputSlice, OutputSlice, Recipe, evaluate_setting
from .kernels import Kernel, get_kernel, with_defaults
from ..io.vocab import VocabPlan, is_vocab_tensor
from .expr import Expr, Merge, Output, Read, Vocab, is_pre_tensor, layer_rests, numel, reads_of, rounds_to, stats_ref
from .routing import fold, route
from .tied import HEADS, head_names, tied_embedding


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
    # The parameter-space merge's own tensors, by name: what a routed slot of source
    # `merge` reads (as Read(MERGE_SOURCE, name)), and what a worker writes in place.
    ps_outputs: dict[str, Output] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def peak_bytes(self, sources: Mapping[str, TensorSource]) -> int:
        """Working memory of the most expensive output tensor: its inputs as stored, then
        the larger of a float32 scratch (magnitude selection) and the float32 result with
        its cast to the output dtype; the kernels' chunk buffers are a few MB."""
        def cost(o: Output) -> int:
            if isinstance(o.expr, Read) and o.expr.source == MERGE_SOURCE:
                return cost(self.ps_outputs[o.expr.name]) + numel(o.shape) * (4 + o.dtype.itemsize)
            reads = reads_of(o.expr)
            n = numel(o.shape)
            stored = sum(n * sources[r.source].dtype(r.name).itemsize for r in reads)
            return stored + n * (4 + o.dtype.itemsize)
        return max((cost(o) for o in self.outputs), default=0)


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: the random kernels' masks depend on (seed, tensor), never on order or device."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def plan(recipe: Recipe, sources: Mapping[str, TensorSource], seed: int | None = None,
         vocab: VocabPlan | None = None) -> Plan:
    """``vocab``: the recipe's vocabulary plan (io/vocab.py build), where its tokenizer choice
    re-indexes the embedding and head rows."""
    seed = recipe.seed if seed is None else seed
    _check_compatible(recipe, sources, vocab)
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    outputs: list[Output] = []
    config: dict = {}
    if recipe.merge_method:
        outputs, config = _plan_ps(recipe, sources, seed, out_dtype, vocab)
    ps_outputs = {o.name: o for o in outputs}
    if recipe.routing:
        if vocab is not None and not (recipe.merge_method and recipe.routing.embeddings in (None, MERGE_SOURCE)):
            raise UserError("a routing whose embeddings are a model's keeps that model's vocabulary; with a tokenizer "
                            "choice that re-indexes rows, take the embeddings from the merge (routing.embeddings: merge)")
        outputs, config = route(recipe, sources, outputs, config, out_dtype)
    if out_dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(out_dtype).removeprefix("torch.")
    tok = recipe.tokenizer_choice() or recipe.base_model or recipe.model_refs()[0]
    if tok in ("base", "union"):  # one shared vocabulary (io/vocab.py): its union is the base's
        tok = recipe.base_model or recipe.model_refs()[0]
    if tok not in sources:
        raise UserError(f"tokenizer_source {tok!r} is not one of the recipe's models")
    return Plan(outputs, config, tok, ps_outputs)


def _check_compatible(recipe: Recipe, sources: Mapping[str, TensorSource], vocab: VocabPlan | None) -> None:
    refs = recipe.model_refs()
    missing = [r for r in refs if r not in sources]
    if missing:
        raise RuntimeError(f"sources not opened: {missing}")
    first = sources[refs[0]]
    for r in refs[1:]:
        s = sources[r]
        if s.arch.model_type != first.arch.model_type:
            raise UserError(f"architectures differ: {refs[0]} is {first.arch.model_type!r}, {r} is {s.arch.model_type!r}; merge models of one family")
        if vocab is None and s.arch.vocab_size != first.arch.vocab_size:
            raise UserError(f"vocabulary sizes differ: {refs[0]} has {first.arch.vocab_size}, {r} has {s.arch.vocab_size}; merge models that share one tokenizer, or give a tokenizer choice (tokenizer_source: union) to re-index their rows")
        if s.arch.layer_prefix != first.arch.layer_prefix:
            raise UserError(f"layer naming differs: {refs[0]} uses {first.arch.layer_prefix!r}, {r} uses {s.arch.layer_prefix!r}")


def _slices(recipe: Recipe, sources: Mapping[str, TensorSource], kernel: Kernel) -> list[OutputSlice]:
    if recipe.slices:
        return list(recipe.slices)
    models = list(recipe.models or [])
    ins = [InputSlice(model=m.model, layer_range=(0, sources[m.model].arch.num_layers), parameters=m.parameters) for m in models]
    if kernel.takes_base and recipe.base_model and recipe.base_model not in [m.model for m in models]:
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


def _plan_ps(recipe: Recipe, sources: Mapping[str, TensorSource], seed: int, out_dtype,
             vocab: VocabPlan | None) -> tuple[list[Output], dict]:
    kernel = get_kernel(recipe.merge_method)
    slices = _slices(recipe, sources, kernel)
    _check_param_names(recipe, kernel, slices)
    for sl in slices:
        names = [s.model for s in sl.sources]
        twice = sorted({m for m in names if names.count(m) > 1})
        if twice:  # mergekit refuses it too ("Duplicate merge inputs"); a weight says it better
            raise UserError(f"{twice[0]} is listed twice in one slice; list each model once (give it a larger weight instead)")
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

    ref_name = recipe.base_model or slices[0].sources[0].model
    ref = sources[ref_name]
    arch = ref.arch
    pre, post = [], []
    for name in list(ref.entries):
        if arch.split(name) is None and name not in HEADS:
            (pre if is_pre_tensor(name) else post).append(name)
    post += head_names(ref_name, ref, {s.model: sources[s.model] for s in slices[-1].sources})

    outputs: list[Output] = []

    def add(out_name: str, sl: OutputSlice, in_names: list[str], t: float) -> None:
        o = _plan_tensor(recipe, kernel, sl, out_name, in_names, t, sources, seed, out_dtype, vocab)
        if vocab is not None and is_vocab_tensor(out_name):
            # mergekit re-indexes in the recipe's dtype, else in the stored dtypes' promotion (a
            # worker holds bf16 sources in float32: the cast back to bf16 is exact)
            stored = [sources[r.source].dtype(r.name) for r in reads_of(o.expr)]
            load = DTYPES.get(recipe.dtype or "") or functools.reduce(torch.promote_types, stored)
            o = Output(o.name, (vocab.size, *o.shape[1:]), o.dtype, Vocab(o.expr, tuple(s.model for s in sl.sources), vocab, load))
        outputs.append(o)

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
    # t = 0 after the blocks as before them: mergekit 0.1.5 plans both with the ConfigReader
    # it makes at t=0 (MergePlanner.plan_module), so a gradient's first value applies to
    # the final norm and the head too
    for name in post:
        add(name, slices[-1], [name] * len(slices[-1].sources), 0.0)

    config = dict(ref.config)
    config[arch.layer_count_key] = layer
    if vocab is not None:
        config["vocab_size"] = vocab.size
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


def _plan_tensor(recipe, kernel, sl, out_name, in_names, t, sources, seed, out_dtype, vocab=None) -> Output:
    """``in_names``: each source's name for the tensor, what its parameters' filters see
    (mergekit matches per-model filters against the input's name, global ones against the
    output's); a tied source reads its embeddings for a head it does not store."""
    base_ref = sl.base_model or recipe.base_model
    reads, shapes, stored = [], {}, []
    for s, n in zip(sl.sources, in_names):
        src = sources[s.model]
        r = n if n in src else tied_embedding(src, n)
        if r is None:
            raise UserError(f"{s.model} has no tensor {n!r} (needed for {out_name}); the models' layouts differ")
        reads.append(r)
        shapes[s.model] = src.shape(r)
        stored.append(src.dtype(r))
    rows_differ = vocab is not None and is_vocab_tensor(out_name)  # re-indexed to one vocabulary
    if len({v[1:] if rows_differ else v for v in shapes.values()}) > 1:
        detail = ", ".join(f"{m} {list(v)}" for m, v in shapes.items())
        raise UserError(f"shape mismatch for {out_name}: {detail}; merge models of one architecture and size")
    first = sl.sources[0]
    shape = shapes[first.model]
    if not stored[0].is_floating_point:
        return Output(out_name, shape, stored[0], Read(first.model, reads[0]))
    # without a dtype, mergekit computes in and writes the inputs' promoted dtype
    dtype = out_dtype or functools.reduce(torch.promote_types, stored)
    load = DTYPES.get(recipe.dtype or "")

    base = None
    inputs, model_params, stats = [], [], []
    for s, n, r, d in zip(sl.sources, in_names, reads, stored):
        read = Read(s.model, r, rounds_to(d, load))
        if kernel.takes_base and s.model == base_ref:
            base = read
            continue
        inputs.append(read)
        if kernel.stats:
            stats.append(_stats_read(kernel.stats, s.model, r, sources))
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
    # mergekit's kernels return `dtype`; only then is the result cast to out_dtype
    through = load if load is not None and load != dtype else None
    if kernel.stats:
        params = {**params, **_stats_params(kernel.stats, stats, sources)}
    expr = Merge(kernel.name, tuple(inputs), base, tuple(model_params), params, tensor_seed(seed, out_name), through,
                 tuple(stats))
    return Output(out_name, shape, dtype, expr)


def _stats_read(kind: str, model: str, name: str, sources) -> Read | None:
    ref = stats_ref(kind, model)
    if ref not in sources:
        raise UserError(f"merge method needs {kind} statistics of {model}; give the recipe a calibration: section "
                        "(data: FILE.jsonl or task: NAME)")
    return Read(ref, name) if name in sources[ref] else None


def _stats_params(kind: str, stats: list, sources) -> dict:
    """What the planner tells a stats kernel about a tensor's layout (GPT-2's Conv1D weights
    are stored [in, out]: RegMean solves them without the transposes)."""
    first = next((r for r in stats if r is not None), None)
    if kind != "gram" or first is None:
        return {}
    return {"conv1d": sources[first.source].is_conv1d(first.name)}


def compute(output: Output, get, device: str | torch.device = "cpu") -> torch.Tensor:
    """One planned tensor, in its output dtype. ``get(Read) -> Tensor`` supplies inputs
    (including ``Read(MERGE_SOURCE, name)``: the merge's tensor ``name`` as written).

    A routed slot's residual writer is folded after rounding to the output dtype, so the
    fold of a merged tensor is the fold of the merge as written (see routing.py)."""
    t = evaluate(output.expr, get, device).to(output.dtype)
    return fold(t, output.divide_by, output.dtype) if output.divide_by != 1.0 else t


def load(read: Read, get, device) -> torch.Tensor:
    """A source tensor on ``device``, rounded to the recipe's ``dtype`` where the plan says so."""
    x = get(read).to(device)
    return x.to(read.rounds_to) if read.rounds_to is not None else x


def evaluate(expr: Expr, get, device) -> torch.Tensor:
    if isinstance(expr, Vocab):
        raw = {}
        for r in expr.reads():
            x = get(r).to(device)
            raw[r.source] = x.to(expr.load) if x.is_floating_point() else x
        key = tuple((r.source, r.name) for r in expr.reads())
        aligned = expr.plan.align({m: raw[m] for m in expr.order if m in raw}, key=(key, str(device)))
        return evaluate(expr.inner, lambda r: aligned[r.source], device)
    if isinstance(expr, Read):
        x = load(expr, get, device)
        return x.float() if x.is_floating_point() else x
    kernel = get_kernel(expr.kernel)
    tensors = [load(r, get, device) for r in expr.inputs]
    base = load(expr.base, get, device) if expr.base is not None else None
    stats = [None if r is None else get(r).to(device) for r in expr.stats]
    out = kernel.fn(tensors, base, expr.model_params, expr.params, seed=expr.seed, stats=stats)
    return out.to(expr.rounds_to).float() if expr.rounds_to is not None else out
