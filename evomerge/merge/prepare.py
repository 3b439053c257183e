"""What a recipe needs beyond its sources' tensors, made ready before planning.

- ``align:`` permutes every other model onto the reference (Git Re-Basin), in memory;
- a data-dependent kernel (fisher, regmean) gets each source's statistics, computed once
  from the recipe's ``calibration:`` and cached (evomerge/stats/cache.py), opened as
  sources of their own (``stats_ref(kind, model)``) that the plan reads per tensor;
- a whole-model method (zipit) is merged here, and the plan copies its result.

`evomerge merge` and the search's workers both call ``prepare``, so they plan the same
recipe over the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserError
from ..io.safetensors_file import read_header, read_tensor
from ..recipe import Recipe, parse_recipe
from .expr import stats_ref
from .kernels import get_kernel
from .live import MemorySource

ZIPPED = "zipit-result"  # the source name of a zipit merge's result


class FisherSource:
    """A model's diagonal Fisher, each tensor divided by the L2 norm of the whole Fisher
    (Matena & Raffel's ``normalize_fishers``: models weigh by their merge weights, not by
    how large their gradients happen to be)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        entries, _ = read_header(self.path)
        # held in memory: a search's worker reads every tensor once per candidate
        self.tensors = {name: read_tensor(e).float() for name, e in entries.items()}
        norm = sum(float(t.double().square().sum()) for t in self.tensors.values()) ** 0.5 or 1.0
        for t in self.tensors.values():
            t.div_(norm)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class GramSource:
    """A model's per-linear input Grams, per token (as RegMean's reference code keeps them)."""

    def __init__(self, path: str | Path):
        from ..stats.gram import GramFile

        self.path = Path(path)
        self.file = GramFile(path)
        self._means: dict[str, torch.Tensor] = {}  # by stored key: q/k/v share one input's Gram

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def get(self, name: str) -> torch.Tensor:
        key = self.file.key(name)
        if key not in self._means:
            self._means[key] = self.file.mean(name)
        return self._means[key]

    def is_conv1d(self, name: str) -> bool:
        return name in self.file.conv1d


def needs_calibration(method: str, where: str = "the recipe") -> UserError:
    """The one error for a data-dependent method without calibration texts."""
    return UserError(f"merge method {method!r} learns from data: add a calibration: section to {where} "
                     "(data: FILE.jsonl, or task: an lm-eval task whose documents to use)")


def prepare(recipe: Recipe, sources: Mapping, device: str = "cpu") -> tuple[Recipe, dict]:
    """(the recipe to plan, the sources to plan it over)."""
    sources = dict(sources)
    kernel = get_kernel(recipe.merge_method) if recipe.merge_method else None
    if kernel is not None and kernel.whole_model and recipe.calibration is None:
        raise needs_calibration(kernel.name)  # one set for both models: their features are compared on it
    if recipe.align is not None:
        if kernel is not None and kernel.stats:
            raise UserError(f"align: with {kernel.name!r} is not supported; write the aligned model first "
                            "(evomerge align A B OUT) and merge that")
        sources = _aligned(recipe, sources)
    if kernel is not None and kernel.stats:
        sources.update(stats_sources(kernel.name, merged_models(recipe), sources, recipe.calibration, device,
                                     _own_calibrations(recipe)))
    if kernel is not None and kernel.whole_model:
        return _zipped(recipe, sources)
    return recipe, sources


def merged_models(recipe: Recipe) -> list[str]:
    """The models a PS merge reads (models or slices' sources), first-seen order."""
    refs = [m.model for m in recipe.models or []]
    for sl in recipe.slices or []:
        refs += [s.model for s in sl.sources]
    return list(dict.fromkeys(refs))


def _own_calibrations(recipe: Recipe) -> dict:
    return {m.model: m.calibration for m in recipe.models or [] if m.calibration is not None}


def stats_sources(method: str, models: list[str], sources: Mapping, calibration, device: str = "cpu",
                  own: Mapping | None = None) -> dict:
    """Each merged model's statistics for ``method``'s kernel, as plan-readable sources;
    ``own``: models' own calibrations (by model reference), else ``calibration``."""
    from ..stats.cache import fisher_stats, gram_stats

    kind = get_kernel(method).stats
    out = {}
    for ref in models:
        cal = (own or {}).get(ref) or calibration
        if cal is None:
            raise needs_calibration(method, f"the recipe or to {ref}'s entry")
        spec = cal.spec()
        path = sources[ref].path
        if kind == "fisher":
            out[stats_ref(kind, ref)] = FisherSource(fisher_stats(path, spec, labels=cal.fisher_labels,
                                                                  seed=cal.seed, device=device))
        else:
            out[stats_ref(kind, ref)] = GramSource(gram_stats(path, spec, device=device))
    return out


def calibration_batches(recipe: Recipe, tokenizer_dir: str | Path) -> list[dict]:
    from transformers import AutoTokenizer

    from ..stats.calibration import batches, load_texts

    spec = recipe.calibration.spec()
    return batches(AutoTokenizer.from_pretrained(tokenizer_dir), load_texts(spec), spec)


def _aligned(recipe: Recipe, sources: dict) -> dict:
    from ..align.rebasin import align

    refs = recipe.model_refs()
    reference = recipe.align.reference or recipe.base_model or refs[0]
    ref_src = sources[reference]
    ref_state = {n: ref_src.get(n) for n in ref_src.entries}
    batches = calibration_batches(recipe, ref_src.path) if recipe.align.method == "activation" else None
    for other in refs:
        if other == reference:
            continue
        src = sources[other]
        state = align(ref_state, {n: src.get(n) for n in src.entries}, ref_src.config, recipe.align.method, batches,
                      rotate=recipe.align.rotate)
        sources[other] = MemorySource(src.path, src.config, state)
    return sources


def _zipped(recipe: Recipe, sources: dict) -> tuple[Recipe, dict]:
    from ..align.zipit import zipit
    from .kernels import with_defaults

    models = merged_models(recipe)
    if len(models) != 2 or recipe.slices or recipe.base_model:
        raise UserError("zipit merges exactly two models: list them under 'models' (no slices, no base_model)")
    _, params = with_defaults(get_kernel("zipit"), [], recipe.parameters or {})
    a, b = (sources[m] for m in models)
    layers = None if params["zip_layers"] < 0 else int(params["zip_layers"])
    state, config = zipit({n: a.get(n) for n in a.entries}, {n: b.get(n) for n in b.entries}, a.config,
                          calibration_batches(recipe, a.path), ratio=params["ratio"], layers=layers, beta=params["beta"])
    data = {"merge_method": "linear", "models": [{"model": ZIPPED, "parameters": {"weight": 1.0}}],
            "tokenizer_source": recipe.tokenizer_source or models[0]}
    for key in ("dtype", "out_dtype"):
        if getattr(recipe, key):
            data[key] = getattr(recipe, key)
    return parse_recipe(data), {**sources, ZIPPED: MemorySource(a.path, config, state)}
