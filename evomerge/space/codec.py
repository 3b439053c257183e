"""Genome x in [0,1]^n  <->  Recipe.

The dimensions come from what the kernel declares tunable (ParamSpec.tunable,
with its bounds), times the sources and layer groups of the PS space, plus an
on/off gene and a scale gene per candidate slot of the DFS space. Per-layer
values are written as mergekit gradients (one point per layer group, linearly
interpolated between), so a PS recipe is a plain mergekit config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..merge.kernels import get_kernel, with_defaults
from ..recipe import MERGE_SOURCE, Recipe, parse_recipe
from .config import SearchConfig

PARTS = (("attn", "attn"), ("mlp", "mlp"), ("rest", None))  # (name, filter); None = catch-all


@dataclass(frozen=True)
class Gene:
    name: str  # e.g. "weight/rev/g2/mlp", "slot7/on"
    low: float
    high: float

    def value(self, x: float) -> float:
        return self.low + float(x) * (self.high - self.low)

    def position(self, v: float) -> float:
        return (float(v) - self.low) / (self.high - self.low)


class SearchSpace:
    def __init__(self, cfg: SearchConfig, layer_counts: dict[str, int]):
        """``layer_counts``: number of blocks of every model in ``cfg`` (for groups and DFS slots)."""
        self.cfg = cfg
        self.genes: list[Gene] = []
        self.ps_keys: list[tuple[str, str | None, str]] = []  # (param, model or None for global, part)
        self.groups = 0
        if cfg.ps is not None:
            self._init_ps(layer_counts)
        self.slots: list[tuple[str, int]] = []
        if cfg.dfs is not None:
            self._init_dfs(layer_counts)
        if not self.genes:
            raise UserError("the search space has no genes: tune at least one parameter or give a dfs space")

    # -- parameter space -----------------------------------------------------------------
    def _init_ps(self, layer_counts: dict[str, int]) -> None:
        ps = self.cfg.ps
        kernel = get_kernel(ps.method)
        if kernel.whole_model:
            raise UserError(f"ps.method {ps.method!r} merges whole models, not layer by layer; "
                            "try its settings with `evomerge merge` (parameters: ratio, beta, zip_layers)")
        if kernel.stats and self.cfg.calibration is None and any(m not in self.cfg.model_calibration for m in self.cfg.models):
            from ..merge.prepare import needs_calibration

            raise needs_calibration(ps.method, "the config")
        tunable = {p.name: p for p in kernel.params if p.tunable}
        tune = ps.tune if ps.tune is not None else {n: None for n in tunable}
        layers = layer_counts[self.cfg.base_model or self.cfg.models[0]]
        self.groups = 1 if ps.layer_granularity == 0 else math.ceil(layers / ps.layer_granularity)
        self.parts = PARTS if ps.split_attn_mlp else (("all", None),)
        self.members = [m for m in self.cfg.models if not (kernel.takes_base and m == self.cfg.base_model)]
        for name, bounds in tune.items():
            if name not in tunable:
                raise UserError(f"ps.tune: {ps.method} has no tunable parameter {name!r} (tunable: {', '.join(tunable) or 'none'})")
            spec = tunable[name]
            low, high = bounds if bounds is not None else (spec.low, spec.high)
            if not low < high:
                raise UserError(f"ps.tune.{name}: bounds [{low}, {high}] must have low < high")
            for end in (low, high):
                _check_bound(kernel, spec, end)
            owners = self.members if spec.per_model else [None]
            for model in owners:
                for part, _ in self.parts:
                    self.ps_keys.append((name, model, part))
                    for g in range(self.groups):
                        label = "/".join(x for x in (name, _short(model), f"g{g}", part) if x)
                        self.genes.append(Gene(label, low, high))

    # -- data-flow space -----------------------------------------------------------------
    def _init_dfs(self, layer_counts: dict[str, int]) -> None:
        dfs = self.cfg.dfs
        merged_layers = layer_counts[self.cfg.base_model or self.cfg.models[0]]
        for _ in range(dfs.repeats):
            for src in self.cfg.dfs_sources():
                n = merged_layers if src == MERGE_SOURCE else layer_counts[src]
                self.slots.extend((src, layer) for layer in range(n))
        self.dfs_offset = len(self.genes)
        lo, hi = dfs.scale_bounds
        for k, (src, layer) in enumerate(self.slots):
            self.genes.append(Gene(f"slot{k}/{_short(src)}.{layer}/on", 0.0, 1.0))
        if dfs.scales:
            for k, (src, layer) in enumerate(self.slots):
                self.genes.append(Gene(f"slot{k}/{_short(src)}.{layer}/scale", lo, hi))

    @property
    def dim(self) -> int:
        return len(self.genes)

    def default_x0(self) -> np.ndarray:
        """The middle of every PS bound; for DFS, the embedding source's own path (its first repeat on, scales 1)."""
        x = np.full(self.dim, 0.5)
        if self.cfg.dfs is not None:
            n = len(self.slots)
            start = self.cfg.dfs.embeddings or (MERGE_SOURCE if self.cfg.ps else self.cfg.base_model)
            first = next((k for k, (src, _) in enumerate(self.slots) if src == start), None)
            for k, (src, layer) in enumerate(self.slots):
                x[self.dfs_offset + k] = 0.75 if first is not None and src == start and k - first == layer else 0.25
                if self.cfg.dfs.scales:
                    scale = self.genes[self.dfs_offset + n + k]
                    x[self.dfs_offset + n + k] = min(1.0, max(0.0, scale.position(1.0)))
        return x

    # -- decode / encode -----------------------------------------------------------------
    def decode(self, x: Sequence[float]) -> Recipe:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has shape {x.shape}, space has {self.dim} genes")
        data: dict = {}
        if self.cfg.ps is not None:
            data.update(self._decode_ps(x))
        if self.cfg.dfs is not None:
            data["routing"] = self._decode_dfs(x)
            if self.cfg.ps is None:
                data["base_model"] = self.cfg.base_model
        data["seed"] = self.cfg.optimizer.seed
        if self.cfg.calibration is not None:
            data["calibration"] = self.cfg.calibration.model_dump(exclude_defaults=True)
        if self.cfg.dtype:
            data["out_dtype"] = self.cfg.dtype
        if self.cfg.tokenizer is not None:
            data["tokenizer"] = self.cfg.tokenizer.model_dump(mode="json", exclude_none=True)
        return parse_recipe(data, where="decoded genome")

    def _member(self, model: str, params: dict) -> dict:
        entry = {"model": model}
        if params:
            entry["parameters"] = params
        own = self.cfg.model_calibration.get(model)
        if own is not None:
            entry["calibration"] = own.model_dump(exclude_defaults=True)
        return entry

    def _values(self, x: np.ndarray, start: int) -> list[float]:
        return [round(self.genes[start + g].value(x[start + g]), 6) for g in range(self.groups)]

    def _setting(self, x: np.ndarray, key_index: int):
        """The setting of one (param, model) pair: gradient per part, filtered when split."""
        per_part = []
        for p, (part, flt) in enumerate(self.parts):
            start = (key_index + p) * self.groups
            vals = self._values(x, start)
            per_part.append((flt, vals[0] if len(vals) == 1 else vals))
        if len(per_part) == 1:
            return per_part[0][1]
        return [{"filter": flt, "value": v} if flt else {"value": v} for flt, v in per_part]

    def _decode_ps(self, x: np.ndarray) -> dict:
        ps = self.cfg.ps
        per_model: dict[str, dict] = {m: {} for m in self.members}
        global_params: dict = dict(ps.fixed)
        for i in range(0, len(self.ps_keys), len(self.parts)):
            name, model, _ = self.ps_keys[i]
            setting = self._setting(x, i)
            if model is None:
                global_params[name] = setting
            else:
                per_model[model][name] = setting
        data = {"merge_method": ps.method,
                "models": [self._member(m, per_model[m]) for m in self.members]}
        if self.cfg.base_model:
            data["base_model"] = self.cfg.base_model
        if global_params:
            data["parameters"] = global_params
        return data

    def _decode_dfs(self, x: np.ndarray) -> dict:
        n = len(self.slots)
        on = x[self.dfs_offset:self.dfs_offset + n] > 0.5
        if not on.any():
            # an empty path is no model; keep the slot the genome leans to most
            on[int(np.argmax(x[self.dfs_offset:self.dfs_offset + n]))] = True
        slots = []
        limit = self.cfg.dfs.max_cumulative_scale
        c = 1.0  # the cumulative scale c_k, held within [1/limit, limit] so the path folds safely
        for k in np.flatnonzero(on):
            src, layer = self.slots[k]
            slot = {"source": src, "layer": layer}
            if self.cfg.dfs.scales:
                wanted = c * self.genes[self.dfs_offset + n + k].value(x[self.dfs_offset + n + k])
                slot["scale"] = round(min(limit, max(1 / limit, wanted)) / c, 6)
                c *= slot["scale"]
            slots.append(slot)
        routing = {"slots": slots}
        if self.cfg.dfs.embeddings:
            routing["embeddings"] = self.cfg.dfs.embeddings
        return routing

    def encode(self, recipe: Recipe) -> np.ndarray:
        """A genome that decodes to ``recipe`` (off slots get gene 0.25, their scales the midpoint)."""
        x = np.full(self.dim, 0.5)
        if self.cfg.ps is not None:
            params = {m.model: (m.parameters or {}) for m in recipe.models or []}
            for i in range(0, len(self.ps_keys), len(self.parts)):
                name, model, _ = self.ps_keys[i]
                setting = (recipe.parameters or {})[name] if model is None else params[model][name]
                for p in range(len(self.parts)):
                    value = setting[p].value if len(self.parts) > 1 else setting
                    vals = value if isinstance(value, list) else [value]
                    for g in range(self.groups):
                        idx = (i + p) * self.groups + g
                        x[idx] = self.genes[idx].position(vals[g])
        if self.cfg.dfs is not None and recipe.routing is not None:
            n = len(self.slots)
            x[self.dfs_offset:self.dfs_offset + n] = 0.25
            k = 0
            for slot in recipe.routing.slots:
                while self.slots[k] != (slot.source, slot.layer):
                    k += 1
                x[self.dfs_offset + k] = 0.75
                if self.cfg.dfs.scales:
                    x[self.dfs_offset + n + k] = self.genes[self.dfs_offset + n + k].position(slot.scale)
                k += 1
        return x


def _check_bound(kernel, spec, value: float) -> None:
    """Let the kernel's own parameter checks say whether a bound is a valid value (e.g. density in (0, 1])."""
    model = {p.name: 1.0 for p in kernel.params if p.per_model and p.default is None}
    glob = {p.name: 0.5 for p in kernel.params if not p.per_model and p.default is None}
    (model if spec.per_model else glob)[spec.name] = value
    try:
        with_defaults(kernel, [model], glob)
    except UserError as e:
        raise UserError(f"ps.tune.{spec.name}: bound {value} is not valid: {e}") from None


def _short(ref: str | None) -> str:
    if ref is None:
        return ""
    return ref.rstrip("/").rsplit("/", 1)[-1]
