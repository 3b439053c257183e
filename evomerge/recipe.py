"""The recipe: one YAML format for `evomerge merge`, the search and export.

A superset of mergekit's merge configuration (``merge_method``, ``base_model``,
``models`` or ``slices``, ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``) plus ``routing``: a data-flow-space path of slots, each
running one layer of one source (or of this recipe's own parameter-space
merge, named ``merge``) with its input scaled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .errors import UserError
from .io.chat_template import AUTO as CHAT_TEMPLATE_AUTO
from .io.chat_templates import NAMED as NAMED_CHAT_TEMPLATES
from .yaml_files import read_yaml, validate

MERGE_SOURCE = "merge"  # a routing slot's source naming the recipe's own PS merge
DTYPES = ("float32", "float16", "bfloat16")
COMPUTE_DTYPES = ("auto", *DTYPES)  # auto: float32 on a CPU, the stored dtype on a GPU (evomerge/dtypes.py)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Scalar = Union[bool, int, float, str]


class Conditional(_Frozen):
    filter: Optional[str] = None
    value: Union[Scalar, list[float], list[Scalar]]


# a lone {filter, value} is a one-entry list of them, as in mergekit
Setting = Union[Scalar, list[float], list[Scalar], list[Conditional], Conditional]


class Calibration(_Frozen):
    """Texts for data-dependent methods (fisher, regmean, zipit, activation alignment):
    a JSONL file's ``field`` or an lm-eval task's documents (evomerge/stats/calibration.py)."""

    data: Optional[str] = None
    task: Optional[str] = None
    task_path: Optional[str] = None
    field: str = "text"
    limit: int = 256
    max_length: int = 64
    batch_size: int = 16
    seed: int = 0
    fisher_labels: Literal["sampled", "data"] = "sampled"  # see evomerge/stats/fisher.py

    def spec(self):
        from .stats.calibration import CalibrationSpec

        return CalibrationSpec(data=self.data, task=self.task, task_path=self.task_path, field=self.field,
                               limit=self.limit, max_length=self.max_length, batch_size=self.batch_size, seed=self.seed)


class InputModel(_Frozen):
    model: str
    parameters: Optional[dict[str, Setting]] = None
    # this model's own calibration texts (Fisher merging and RegMean compute each model's
    # statistics on its own task's data); default: the recipe's calibration
    calibration: Optional[Calibration] = None


class InputSlice(_Frozen):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Setting]] = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v):
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(_Frozen):
    sources: list[InputSlice]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Setting]] = None
    residual_weight: Optional[float] = None  # mergekit 0.1.5 declares it and never reads it: accepted, no effect


class ModelToken(_Frozen):
    """A token's embedding taken from another token of a model: ``token_id`` (that model's
    row) or ``token`` (looked up in that model's own tokenizer)."""

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source names exactly one of token_id or token")
        return self


class ZeroToken(_Frozen):
    kind: Literal["zero"]


class TokenSource(_Frozen):
    """One entry of ``tokenizer.tokens``, as mergekit reads it: where a token's embedding
    comes from for the models that lack it (``force``: for every model)."""

    source: Union[ModelToken, ZeroToken, str]
    force: bool = False


class TokenizerSection(_Frozen):
    """mergekit's ``tokenizer:`` section: the output vocabulary and, per token, where its
    embedding comes from (evomerge/io/vocab.py)."""

    source: str = "union"  # union | base | a model of the recipe
    tokens: Optional[dict[str, TokenSource]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("pad_to_multiple_of must be a positive number of rows")
        return v


class Slot(_Frozen):
    source: str
    layer: int
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _positive(cls, v):
        # the fold relies on norm(c*x) == norm(x), true only for c > 0
        if not v > 0:
            raise ValueError(f"slot scale {v} must be > 0")
        return v


class Routing(_Frozen):
    slots: list[Slot]
    # where embeddings, final norm and head come from; default: the merge if any, else base_model
    embeddings: Optional[str] = None

    @field_validator("slots")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("routing needs at least one slot")
        return v


class Align(_Frozen):
    """Permute every other model onto ``reference`` (Git Re-Basin) before merging."""

    method: Literal["weight", "activation"]
    reference: Optional[str] = None  # default: base_model, else the first model
    # then rotate the heads' dims onto the reference's too (evomerge/align/rotations.py),
    # where the architecture allows; false: permutations only, as Ainsworth et al.
    rotate: bool = True


class Recipe(_Frozen):
    merge_method: Optional[str] = None
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict[str, Setting]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[str] = None  # "auto" or a Jinja template (evomerge/io/chat_template.py)
    routing: Optional[Routing] = None
    calibration: Optional[Calibration] = None
    align: Optional[Align] = None
    seed: int = 0  # for random kernels (DARE); `evomerge merge --seed` overrides

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v):
        if v is not None and v != CHAT_TEMPLATE_AUTO and v not in NAMED_CHAT_TEMPLATES and (len(v) < 20 or "{" not in v):
            raise ValueError(f"chat_template must be 'auto' (the models' most common template), a format's name "
                             f"({', '.join(NAMED_CHAT_TEMPLATES)}) or a Jinja template's text")
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @model_validator(mode="after")
    def _shape(self):
        if self.models and self.slices:
            raise ValueError("give either 'models' or 'slices', not both")
        if self.merge_method and not (self.models or self.slices):
            raise ValueError(f"merge_method {self.merge_method!r} needs 'models' or 'slices' to merge")
        if not self.merge_method and (self.models or self.slices):
            raise ValueError("'models'/'slices' given without a merge_method")
        if not self.merge_method and not self.routing:
            raise ValueError("a recipe needs a merge_method, a routing, or both")
        if self.routing:
            if not self.merge_method and any(s.source == MERGE_SOURCE for s in self.routing.slots):
                raise ValueError(f"routing slot source {MERGE_SOURCE!r} needs a merge_method to merge")
            if not self.merge_method and not (self.routing.embeddings or self.base_model):
                raise ValueError("a routing-only recipe needs base_model or routing.embeddings (for embeddings and head)")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either tokenizer_source or a tokenizer: section, not both")
        if self.align and self.routing:
            raise ValueError("align: permutes whole models; it does not combine with routing")
        if self.align and self.align.method == "activation" and not self.calibration:
            raise ValueError("align method 'activation' needs a calibration: section (data: FILE.jsonl or task: NAME)")
        if self.align and self.align.reference and self.align.reference not in self.model_refs():
            raise ValueError(f"align.reference {self.align.reference!r} is not one of the recipe's models")
        return self

    # -- derived views -------------------------------------------------------
    def model_refs(self) -> list[str]:
        """Every model the recipe reads, first-seen order, the base first."""
        refs = [self.base_model] if self.base_model else []
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs.extend(src.model for src in s.sources)
            if s.base_model:
                refs.append(s.base_model)
        if self.routing:
            refs.extend(s.source for s in self.routing.slots if s.source != MERGE_SOURCE)
            if self.routing.embeddings and self.routing.embeddings != MERGE_SOURCE:
                refs.append(self.routing.embeddings)
        return list(dict.fromkeys(refs))

    def tokenizer_choice(self) -> str | None:
        """The tokenizer source asked for (``tokenizer:`` section or ``tokenizer_source``), if any."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def hash(self) -> str:
        """Content hash: equal recipes give equal tensors (the search's cache key)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a YAML mapping with merge_method/models or routing")
    if "modules" in data:
        data = _one_module(data, where)
    return validate(Recipe, data, where)


def _one_module(data: dict, where: str) -> dict:
    """mergekit's ``modules:`` form for a decoder-only model, whose one module mergekit calls
    ``default``: the same recipe with the module's models or slices at the top. The module's
    ``parameters`` rank between the slice's (or, for ``models``, none) and the recipe's, so
    they join the slices' parameters (``models``: the recipe's); a name set at both levels is
    refused, since mergekit falls through to the next level wherever a filter matches nothing."""
    modules = data["modules"]
    if not isinstance(modules, dict) or list(modules) != ["default"]:
        names = ", ".join(map(str, modules)) if isinstance(modules, dict) else repr(modules)
        raise UserError(f"{where}: modules ({names}): evomerge merges decoder-only models, whose one module mergekit "
                        "calls 'default'; multi-module models (vision towers, encoders) are not supported")
    if data.get("models") or data.get("slices"):
        raise UserError(f"{where}: give 'modules' or 'models'/'slices', not both")
    module = modules["default"] or {}
    if not isinstance(module, dict) or bool(module.get("models")) == bool(module.get("slices")):
        raise UserError(f"{where}: modules.default needs either 'models' or 'slices'")
    extra = sorted(set(module) - {"models", "slices", "parameters"})
    if extra:
        raise UserError(f"{where}: modules.default.{extra[0]} is not a module field (models, slices, parameters)")
    mp = module.get("parameters") or {}
    out = {k: v for k, v in data.items() if k != "modules"}

    def joined(inner, level: str) -> dict | None:
        both = sorted(set(inner or {}) & set(mp))
        if both:
            raise UserError(f"{where}: parameter {both[0]!r} is set in modules.default and in {level}; set it in one")
        return {**(inner or {}), **mp} or None

    if module.get("models"):
        out["models"] = module["models"]
        out["parameters"] = joined(data.get("parameters"), "the recipe's parameters")
    else:
        out["slices"] = [dict(sl, parameters=joined(sl.get("parameters"), f"slice {i}"))
                         for i, sl in enumerate(module["slices"])]
    return {k: v for k, v in out.items() if v is not None}


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_yaml(path, "recipe file"), where=str(path))


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor, mergekit 0.1.5's way (its config.evaluate_setting).

    Scalars are themselves; a numeric list is a gradient interpolated at t (the
    tensor's relative depth in its slice: layer i of n takes i / (n - 1), a one-layer
    slice 1, the tensors before and after the blocks 0); a list of {filter, value}
    takes the first whose filter is a substring of the tensor name (no filter or '*'
    matches all), a lone {filter, value} likewise. Returns None when no filter matches
    (or for an empty list), and the caller looks in the next scope.
    """
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, Conditional):
        setting = [setting]
    if not setting:
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        if cond.filter in (None, "*") or cond.filter in tensor_name:
            return evaluate_setting(cond.value, tensor_name, t)
    return None
