"""The merge kernels: what parameters each takes, and the registry that names them.

A kernel merges one tensor at a time. Its ``fn`` takes the source models' tensors
(without the base for ``uses_base`` kernels), the base tensor, each source's
per-model parameters and the global parameters, fills in declared defaults, checks
them, and returns the merged tensor in float32. The genome's dimensions come from the
``tunable`` parameter declarations here.

Parameter names, defaults and preset flags follow mergekit 0.1.x, so a mergekit recipe
means the same thing here. ``rescale`` also takes mergekit's booleans (true = "l1").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from evomerge.errors import UserError, nearest
from evomerge.merge import (arcee_fusion, fisher, karcher, linear, model_stock, multislerp, nearswap, nuslerp, passthrough, ram,
                            regmean, sce, slerp, sparsify, task_vector)
from evomerge.merge.task_vector import SORTED_ABS


@dataclass(frozen=True)
class ParamSpec:
    name: str  # e.g. "weight", "density", "t", "lambda", "gamma", "normalize", "rescale"
    per_model: bool  # True: one value per source model (mergekit "tensor parameter"); False: global
    default: float | bool | str | None  # None = required
    low: float | None = None  # search bounds the genome uses by default (tunable floats only)
    high: float | None = None
    tunable: bool = False  # True for float params a search may tune


@dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple[ParamSpec, ...]
    uses_base: bool  # task-vector methods and slerp need a base_model; linear does not
    random: bool  # True for dare_* and della* (the seed changes the result)
    fn: Callable[..., Tensor]  # fn(tensors, base, model_params, params, seed=0, stats=()) -> float32 Tensor
    # Data-dependent kernels: the statistic each source brings ("fisher" or "gram"), read per
    # tensor like a source's own tensors (evomerge/merge/prepare.py); None for the others.
    stats: str | None = None
    whole_model: bool = False  # merges whole models at once (zipit); planned by prepare.py, never per tensor
    # nuslerp, multislerp: a base_model, when the recipe names one, is the origin (task
    # vectors are interpolated); without one the models themselves are
    optional_base: bool = False

    @property
    def takes_base(self) -> bool:
        """Whether a recipe's base_model is this kernel's base rather than one more model."""
        return self.uses_base or self.optional_base


WEIGHT = ParamSpec("weight", per_model=True, default=None, low=0.0, high=1.0, tunable=True)
DENSITY = ParamSpec("density", per_model=True, default=1.0, low=0.1, high=1.0, tunable=True)
GAMMA = ParamSpec("gamma", per_model=True, default=0.01, low=0.0, high=0.1, tunable=True)
LAMBDA = ParamSpec("lambda", per_model=False, default=1.0, low=0.5, high=1.5, tunable=True)
T = ParamSpec("t", per_model=False, default=None, low=0.0, high=1.0, tunable=True)
WEIGHT_1 = ParamSpec("weight", per_model=True, default=1.0, low=0.0, high=1.0, tunable=True)  # optional, equal by default
# DELLA keeps each entry with probability density -/+ epsilon by magnitude rank, which must
# stay inside (0, 1): a search's bounds keep every pair valid (0.2 - 0.15 > 0, 0.8 + 0.15 < 1).
DELLA_DENSITY = ParamSpec("density", per_model=True, default=1.0, low=0.2, high=0.8, tunable=True)
EPSILON = ParamSpec("epsilon", per_model=True, default=0.15, low=0.0, high=0.15, tunable=True)
# Accepted so that mergekit recipes load; boolean masks here make it irrelevant.
INT8_MASK = ParamSpec("int8_mask", per_model=False, default=False)

# Valid ranges beyond "a finite number": (low, high, low inclusive, high inclusive).
_RANGES = {"density": (0.0, 1.0, False, True), "gamma": (0.0, 1.0, True, False), "alpha": (0.0, 1.0, True, True),
           "ratio": (0.0, 1.0, True, True), "beta": (0.0, 1.0, True, True), "floor": (0.0, math.inf, False, False),
           "max_iter": (1.0, math.inf, True, False), "tol": (0.0, math.inf, False, False),
           "epsilon": (0.0, math.inf, True, False), "eps": (0.0, math.inf, True, False),
           "select_topk": (0.0, 1.0, True, True), "r": (0.0, math.inf, True, False)}
# Kernels whose keep rule ranks |delta|: a caller may pass each source's sorted_abs.
_RANKS_MAGNITUDES = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", per_model=False, default=default)


def _rescale(default: str) -> ParamSpec:
    return ParamSpec("rescale", per_model=False, default=default)


def _declare(
    name: str, specs: tuple[ParamSpec, ...], uses_base: bool, random: bool, impl: Callable[..., Tensor],
    stats: str | None = None, whole_model: bool = False, optional_base: bool = False,
) -> Kernel:
    """A kernel whose ``fn`` fills defaults and checks its inputs before ``impl`` runs."""

    def fn(
        tensors: Sequence[Tensor],
        base: Tensor | None,
        model_params: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        seed: int = 0,
        stats: Sequence[Tensor | None] = (),
    ) -> Tensor:
        internal = {k: v for k, v in params.items() if k in _PLANNER_PARAMS}
        filled_models, filled = with_defaults(kernel, model_params, {k: v for k, v in params.items() if k not in internal})
        _check_tensors(kernel, tensors, base, filled_models)
        if kernel.stats:
            return impl(tensors, base, filled_models, {**filled, **internal}, seed, stats)
        return impl(tensors, base, filled_models, filled, seed)

    kernel = Kernel(name, specs, uses_base, random, fn, stats, whole_model, optional_base)
    return kernel


# Facts the planner adds to a stats kernel's parameters, never written in a recipe.
_PLANNER_PARAMS = frozenset({"conv1d"})


def _fisher(tensors, base, models, params, seed, stats) -> Tensor:
    return fisher.merge(tensors, stats, [m["weight"] for m in models], params["floor"])


def _regmean(tensors, base, models, params, seed, stats) -> Tensor:
    weights = [m["weight"] for m in models]
    if all(g is not None for g in stats):
        return regmean.merge(tensors, stats, params["alpha"], weights, conv1d=params.get("conv1d", False))
    # no Gram (norms, biases, embeddings): the paper averages these
    return linear.merge(tensors, None, [{"weight": w} for w in weights], {"normalize": True}, seed)


def _whole_model(*_args, **_kwargs) -> Tensor:
    raise AssertionError("a whole-model method is planned by evomerge.merge.prepare, never per tensor")


def _task_vector(
    name: str, sparsification: str | None, consensus: bool, normalize: bool, rescale: str
) -> Kernel:
    specs = [WEIGHT]
    if sparsification:
        specs.append(DELLA_DENSITY if sparsification == "della" else DENSITY)
    if sparsification == "magnitude_outliers":
        specs.append(GAMMA)
    if sparsification == "della":
        specs.append(EPSILON)
    specs += [LAMBDA, _normalize(normalize)]
    if sparsification:
        specs.append(_rescale(rescale))
    specs.append(INT8_MASK)
    impl = functools.partial(task_vector.merge, sparsification=sparsification, consensus=consensus)
    return _declare(name, tuple(specs), uses_base=True, random=sparsification in ("random", "della"), impl=impl)


KERNELS: dict[str, Kernel] = {
    kernel.name: kernel
    for kernel in (
        _declare("linear", (WEIGHT, _normalize(True)), uses_base=False, random=False, impl=linear.merge),
        _declare("slerp", (T,), uses_base=True, random=False, impl=slerp.merge),
        _declare(
            "passthrough", (ParamSpec("scale", per_model=True, default=1.0),), uses_base=False, random=False,
            impl=passthrough.merge,
        ),
        _task_vector("task_arithmetic", None, consensus=False, normalize=False, rescale="none"),
        _task_vector("ties", "magnitude", consensus=True, normalize=True, rescale="none"),
        _task_vector("dare_linear", "random", consensus=False, normalize=False, rescale="l1"),
        _task_vector("dare_ties", "random", consensus=True, normalize=False, rescale="l1"),
        _task_vector("breadcrumbs", "magnitude_outliers", consensus=False, normalize=False, rescale="none"),
        _task_vector("breadcrumbs_ties", "magnitude_outliers", consensus=True, normalize=False, rescale="none"),
        # Deep et al. 2024 (MagPrune); mergekit's della and della_linear
        _task_vector("della", "della", consensus=True, normalize=True, rescale="l1"),
        _task_vector("della_linear", "della", consensus=False, normalize=False, rescale="l1"),
        # Wan et al. 2024 (FuseChat)
        _declare("sce", (ParamSpec("select_topk", per_model=False, default=1.0, low=0.1, high=1.0, tunable=True), INT8_MASK),
                 uses_base=True, random=False, impl=sce.merge),
        # mergekit's nuslerp and multislerp: spherical interpolation, of task vectors when given a base
        _declare("nuslerp", (WEIGHT, ParamSpec("nuslerp_row_wise", per_model=False, default=False),
                             ParamSpec("nuslerp_flatten", per_model=False, default=True)),
                 uses_base=False, random=False, impl=nuslerp.merge, optional_base=True),
        _declare("multislerp", (WEIGHT, ParamSpec("normalize_weights", per_model=False, default=True),
                                ParamSpec("eps", per_model=False, default=1e-8)),
                 uses_base=False, random=False, impl=multislerp.merge, optional_base=True),
        # Arcee's importance-thresholded fusion of one model into its base
        _declare("arcee_fusion", (), uses_base=True, random=False, impl=arcee_fusion.merge),
        # Reinforced Agent Merging (arXiv:2601.13572) and its tensor-local RAM+
        _declare("ram", (ParamSpec("epsilon", per_model=False, default=1e-5),), uses_base=True, random=False, impl=ram.merge),
        _declare("ramplus_tl", (ParamSpec("r", per_model=False, default=0.1, low=0.0, high=0.5, tunable=True),
                                ParamSpec("alpha", per_model=False, default=0.2, low=0.0, high=1.0, tunable=True),
                                ParamSpec("epsilon", per_model=False, default=1e-5)),
                 uses_base=True, random=False, impl=ram.merge_plus),
        # Jang et al. 2024; mergekit's model_stock
        _declare("model_stock", (ParamSpec("filter_wise", per_model=False, default=False),),
                 uses_base=True, random=False, impl=model_stock.merge),
        # the models' Riemannian mean on the sphere; mergekit's karcher
        _declare("karcher", (ParamSpec("max_iter", per_model=False, default=10.0), ParamSpec("tol", per_model=False, default=1e-5)),
                 uses_base=False, random=False, impl=karcher.merge),
        # mergekit's nearswap: t is a distance in weight units (log-scale in practice)
        _declare("nearswap", (ParamSpec("t", per_model=False, default=None, low=0.0, high=1e-2, tunable=True),),
                 uses_base=True, random=False, impl=nearswap.merge),
        # Matena & Raffel 2022; each model's Fisher scaled to unit L2 norm (prepare.py)
        _declare("fisher", (WEIGHT_1, ParamSpec("floor", per_model=False, default=fisher.DEFAULT_FLOOR)),
                 uses_base=False, random=False, impl=_fisher, stats="fisher"),
        # Jin et al. 2023
        _declare("regmean", (WEIGHT_1, ParamSpec("alpha", per_model=False, default=regmean.DEFAULT_ALPHA, low=0.0, high=1.0, tunable=True)),
                 uses_base=False, random=False, impl=_regmean, stats="gram"),
        # Stoica et al. 2023: two models, MLP units zipped (evomerge/align/zipit.py)
        _declare("zipit", (ParamSpec("ratio", per_model=False, default=1.0), ParamSpec("beta", per_model=False, default=0.125),
                           ParamSpec("zip_layers", per_model=False, default=-1.0)),
                 uses_base=False, random=False, impl=_whole_model, whole_model=True),
    )
}


# Where each method is defined (the docs' method table prints these).
REFERENCES: dict[str, str] = {
    "linear": "Wortsman et al. 2022 (model soups)", "slerp": "Shoemake 1985",
    "passthrough": "mergekit (layer stacking)", "task_arithmetic": "Ilharco et al. 2023",
    "ties": "Yadav et al. 2023", "dare_linear": "Yu et al. 2024", "dare_ties": "Yu et al. 2024",
    "breadcrumbs": "Davari & Belilovsky 2024", "breadcrumbs_ties": "Davari & Belilovsky 2024",
    "della": "Deep et al. 2024", "della_linear": "Deep et al. 2024", "sce": "Wan et al. 2024 (FuseChat)",
    "nuslerp": "mergekit (no paper)", "multislerp": "mergekit (Goddard's note, no paper)",
    "arcee_fusion": "Arcee (no paper)", "ram": "arXiv:2601.13572", "ramplus_tl": "arXiv:2601.13572",
    "model_stock": "Jang et al. 2024", "karcher": "Karcher 1977 (mergekit)", "nearswap": "mergekit (no paper)",
    "fisher": "Matena & Raffel 2022", "regmean": "Jin et al. 2023", "zipit": "Stoica et al. 2024",
}


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise UserError(
            f"unknown merge method {name!r}{nearest(name, KERNELS)}; known: {', '.join(KERNELS)}"
        ) from None


def uses_sorted_abs(kernel: Kernel) -> bool:
    """Whether ``fn`` reads an optional per-model ``sorted_abs`` entry (ascending
    |source - base|, from ``sparsify.sorted_abs_delta``) instead of selecting."""
    return kernel.name in _RANKS_MAGNITUDES


def with_defaults(
    kernel: Kernel, model_params: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and global parameters with defaults filled in and values checked.

    A per-model parameter given among the global ones applies to every model that
    does not set it (as in mergekit). Raises UserError for unknown or missing
    parameters and out-of-range values.
    """
    specs = {spec.name: spec for spec in kernel.params}
    for name in params:
        if name not in specs:
            raise UserError(
                f"{kernel.name} has no parameter {name!r}{nearest(name, specs)}; "
                f"its parameters: {', '.join(specs)}"
            )
    filled = {}
    for spec in kernel.params:
        if not spec.per_model:
            filled[spec.name] = _checked(kernel, spec, params.get(spec.name, spec.default), "")
    filled_models = []
    for i, given in enumerate(model_params):
        where = f" for model {i}"
        for name in given:
            if name == SORTED_ABS and uses_sorted_abs(kernel):
                continue
            spec = specs.get(name)
            if spec is None:
                raise UserError(
                    f"{kernel.name} has no parameter {name!r}{nearest(name, specs)}{where}; "
                    f"its parameters: {', '.join(specs)}"
                )
            if not spec.per_model:
                raise UserError(
                    f"{kernel.name} parameter {name!r} applies to the whole merge, not to one model; "
                    "move it out of the model's parameters"
                )
        one = {
            spec.name: _checked(kernel, spec, given.get(spec.name, params.get(spec.name, spec.default)), where)
            for spec in kernel.params
            if spec.per_model
        }
        if SORTED_ABS in given:
            one[SORTED_ABS] = given[SORTED_ABS]
        filled_models.append(one)
    return filled_models, filled


def _checked(kernel: Kernel, spec: ParamSpec, value: Any, where: str) -> Any:
    """``value`` converted to the spec's type, or UserError saying what to set."""
    label = f"{kernel.name} parameter {spec.name!r}{where}"
    if value is None:
        example = f"{spec.name}: {spec.low if spec.low is not None else 0.5}"
        scope = "each model's parameters" if spec.per_model else "the merge's parameters"
        raise UserError(f"{label} is required; set it in {scope} (e.g. {example})")
    if spec.name == "rescale":
        return _rescale_value(label, value)
    if isinstance(spec.default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{label} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not _is_number(value):
        raise UserError(f"{label} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UserError(f"{label} must be finite, got {number}")
    if spec.name in _RANGES:
        low, high, low_in, high_in = _RANGES[spec.name]
        inside = (number >= low if low_in else number > low) and (number <= high if high_in else number < high)
        if not inside:
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise UserError(f"{label} must be in {interval}, got {number:g}")
    return number


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, str)


def _rescale_value(label: str, value: Any) -> str:
    if isinstance(value, bool):  # mergekit's rescale: true means matching the L1 norm
        return "l1" if value else "none"
    if value not in sparsify.RESCALES:
        raise UserError(f"{label} must be one of {', '.join(sparsify.RESCALES)} (or true/false), got {value!r}")
    return value


def _check_tensors(
    kernel: Kernel, tensors: Sequence[Tensor], base: Tensor | None, model_params: Sequence[Mapping[str, Any]]
) -> None:
    if len(model_params) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(model_params)} model parameter sets")
    if kernel.uses_base and base is None:
        raise UserError(f"{kernel.name} needs a base model; set base_model in the recipe")
    shapes = {tuple(x.shape) for x in tensors}
    if base is not None:
        shapes.add(tuple(base.shape))
    if len(shapes) > 1:
        raise UserError(
            f"{kernel.name} got tensors of different shapes {sorted(shapes)}; "
            "merge only models of the same architecture and size"
        )
