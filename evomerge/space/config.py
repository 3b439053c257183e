"""Search configs: what to merge, which recipe parameters to search, how to score, how to run.

Validated on load (unknown keys, bounds, population, tasks...) so that a bad
config fails before a worker starts. Model paths are resolved to absolute
paths, so the frozen copy in the run directory resumes from anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..errors import UserError
from ..fitness.function import FUNCTION_METRIC, FUNCTION_TASK
from ..io.lora import split_ref
from ..recipe import COMPUTE_DTYPES, DTYPES, MERGE_SOURCE, Calibration, TokenizerSection
from ..yaml_files import read_yaml, validate


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PSSpace(_Frozen):
    """Parameter space: the kernel's tunable parameters, per source and per layer group."""

    method: str = "task_arithmetic"
    # parameter -> [low, high]; null takes the kernel's declared bounds. Default: every tunable parameter.
    tune: Optional[dict[str, Optional[tuple[float, float]]]] = None
    fixed: dict[str, Any] = {}  # parameters held constant (e.g. normalize: false)
    layer_granularity: int = 1  # layers per gene group; 0 = one value for all layers
    split_attn_mlp: bool = False  # separate genes for attention, MLP and the other tensors

    @field_validator("layer_granularity")
    @classmethod
    def _gran(cls, v):
        if v < 0:
            raise ValueError("layer_granularity must be >= 0 (0 = one group for all layers)")
        return v


class DFSSpace(_Frozen):
    """Data-flow space (Akiba et al. 2024): the sources' layers, repeated, each on or off, with an input scale.

    Scales are one gene per candidate slot (r*M genes), not Akiba's M x M transition matrix.
    """

    sources: Optional[list[str]] = None  # default: every model, plus 'merge' when a PS space is given
    repeats: int = 2
    scale_bounds: tuple[float, float] = (0.5, 1.5)
    scales: bool = True  # false: layer selection only, every scale 1 (half the genes)
    embeddings: Optional[str] = None  # source of embeddings/head; default 'merge' with PS, else base_model
    # bound on the product of the scales up to each slot (what export divides the slot's residual
    # writers by); 4 folds safely into every output dtype, float16 included (routing.FOLD_LIMITS)
    max_cumulative_scale: float = 4.0

    @field_validator("repeats")
    @classmethod
    def _rep(cls, v):
        if v < 1:
            raise ValueError("repeats must be >= 1")
        return v

    @field_validator("max_cumulative_scale")
    @classmethod
    def _cumulative(cls, v):
        from ..merge.routing import FOLD_LIMITS

        top = max(FOLD_LIMITS.values())
        if not 1 <= v <= top:
            raise ValueError(f"max_cumulative_scale {v} must be in [1, {top:g}] ({top:g} is what folds safely into bf16 weights)")
        return v

    @field_validator("scale_bounds")
    @classmethod
    def _scales(cls, v):
        if not 0 < v[0] < v[1]:
            raise ValueError(f"scale_bounds {list(v)} must satisfy 0 < low < high (scales fold only when positive)")
        return v


class TermConfig(_Frozen):
    task: str
    metric: str = "acc"
    weight: float = 1.0


FUNCTION_TERM = TermConfig(task=FUNCTION_TASK, metric=FUNCTION_METRIC)


class RacingConfig(_Frozen):
    """Score each candidate on the first ``first`` documents of every task's subset; score the
    rest only when it may still beat the ``keep``-th best fully scored candidate of earlier
    generations (evomerge/run/racing.py)."""

    first: int
    keep: int = 4
    confidence: float = 0.95
    warmup: int = 2  # generations scored in full (both stages) before any candidate is stopped

    @field_validator("first", "keep", "warmup")
    @classmethod
    def _positive(cls, v):
        if v < 1:
            raise ValueError(f"racing counts must be >= 1, got {v}")
        return v

    @field_validator("confidence")
    @classmethod
    def _confidence(cls, v):
        if not 0.5 <= v < 1:
            raise ValueError(f"racing confidence {v} must be in [0.5, 1)")
        return v


class FitnessConfig(_Frozen):
    """How candidates are scored: lm-eval ``tasks``, or a ``function`` (fitness/function.py).

    With a function, ``tasks`` reads as its one term (function/fitness, the key of its value in
    the history's scores), so everything that reads the terms (the front, the report) works as for a task."""

    tasks: list[TermConfig] = []
    # "package.module:name", called on each worker as fn(model, tokenizer) -> float | dict
    function: Optional[str] = None
    by_value: bool = False  # the function was passed to evomerge.search(fitness=fn): resume needs it again
    limit: Optional[int] = None  # documents per task (default: all)
    limits: dict[str, int] = {}  # per task, overriding limit
    # which documents a limit keeps: a seeded random subset, the same for every candidate of a
    # run and recorded in its subsets.json, or lm-eval's first N (a biased sample when the
    # data is ordered)
    subset: Literal["random", "first"] = "random"
    subset_seed: int = 0
    racing: Optional[RacingConfig] = None
    # at the end, the N best distinct recipes by their subset fitness are scored on every
    # document of the tasks, and the best of them on those is the run's best (run/confirm.py)
    confirm: Optional[int] = None
    batch_size: int = 64
    task_path: Optional[str] = None  # directory of lm-eval task YAMLs; default: the shipped evomerge/tasks/

    @field_validator("confirm")
    @classmethod
    def _confirm(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"fitness.confirm {v} must be >= 1 candidate")
        return v

    @model_validator(mode="after")
    def _tasks_or_function(self):
        if self.function is None:
            if not self.tasks:
                raise ValueError("fitness needs at least one task, or a function (package.module:name)")
            if self.by_value:
                raise ValueError("fitness.by_value goes with fitness.function")
            if self.confirm and self.limit is None and not self.limits:
                raise ValueError("fitness.confirm rescores on every document what a subset chose; "
                                 "it needs fitness.limit or fitness.limits")
            return self
        # a frozen config holds the function's own term: not a second source of fitness
        if self.tasks and list(self.tasks) != [FUNCTION_TERM]:
            raise ValueError("give fitness.tasks or fitness.function, not both")
        if ":" not in self.function:
            raise ValueError(f"fitness.function {self.function!r} must be an import path: package.module:name")
        given = [k for k in ("limit", "limits", "racing", "confirm") if getattr(self, k)]
        if given:
            raise ValueError(f"fitness.{given[0]} chooses documents of tasks; a fitness function has none")
        object.__setattr__(self, "tasks", [FUNCTION_TERM])  # frozen: set once, while validating
        return self


class OptimizerConfig(_Frozen):
    backend: str = "cma"
    popsize: int = 8
    sigma0: float = 0.2
    seed: int = 0
    max_evals: int = 64
    # stop early, at a generation's end: when the best has not improved for this many
    # generations, or when the run's search time (all sessions together) passes max_wall_s
    patience: Optional[int] = None
    max_wall_s: Optional[float] = None
    # the next generation's first candidates drawn ahead and scored by otherwise idle
    # workers (run/search.py with_lookahead); None: auto, settled when the run starts
    lookahead: Optional[int] = None

    @field_validator("lookahead")
    @classmethod
    def _lookahead(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"lookahead {v} must be >= 0")
        return v

    @field_validator("patience")
    @classmethod
    def _patience(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"patience {v} must be >= 1 generation")
        return v

    @field_validator("max_wall_s")
    @classmethod
    def _wall(cls, v):
        if v is not None and not v > 0:
            raise ValueError(f"max_wall_s {v} must be > 0 seconds")
        return v

    @field_validator("popsize")
    @classmethod
    def _pop(cls, v):
        if v < 2:
            raise ValueError(f"popsize {v} must be >= 2 (an evolution strategy needs a population)")
        return v

    @field_validator("max_evals")
    @classmethod
    def _evals(cls, v):
        if v < 1:
            raise ValueError("max_evals must be >= 1")
        return v


class WorkersConfig(_Frozen):
    count: int = 2  # Ray actors; 0 runs in-process without Ray
    gpus_per_worker: Union[Literal["auto"], float] = "auto"  # auto: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1
    # dtype of the forward passes; auto: float32 on a CPU, the stored dtype on a GPU (see evomerge/dtypes.py)
    compute_dtype: str = "auto"

    @field_validator("compute_dtype")
    @classmethod
    def _compute(cls, v):
        if v not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {v!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        return v


class SearchConfig(_Frozen):
    name: Optional[str] = None
    base_model: Optional[str] = None
    models: list[str]
    dtype: Optional[str] = None  # candidates' (and exports') dtype; default: each tensor's stored dtype
    ps: Optional[PSSpace] = None
    dfs: Optional[DFSSpace] = None
    fitness: FitnessConfig
    test: list[TermConfig] = []  # scored once at the end (held-out splits); never seen by the search
    optimizer: OptimizerConfig = OptimizerConfig()
    workers: WorkersConfig = WorkersConfig()
    calibration: Optional[Calibration] = None  # for data-dependent ps.method (fisher, regmean)
    # a model's own calibration texts (model -> calibration), as the papers compute each
    # model's statistics on its own task's data; the others use ``calibration``
    model_calibration: dict[str, Calibration] = {}
    # the candidates' (and exports') vocabulary, as a recipe's tokenizer: section: models whose
    # tokenizers differ (added tokens) are re-indexed to it once per worker (io/vocab.py)
    tokenizer: Optional[TokenizerSection] = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @model_validator(mode="after")
    def _spaces(self):
        if not self.models:
            raise ValueError("models: list at least one model to merge")
        if self.ps is None and self.dfs is None:
            raise ValueError("give a 'ps' space, a 'dfs' space, or both")
        if self.dfs is not None and self.dfs.sources:
            known = set(self.models) | ({self.base_model} if self.base_model else set()) | ({MERGE_SOURCE} if self.ps else set())
            bad = [s for s in self.dfs.sources if s not in known]
            if bad:
                raise ValueError(f"dfs.sources {bad} must be among models/base_model" + (" or 'merge'" if self.ps else ""))
        if self.dfs is not None and self.ps is None and not (self.base_model or self.dfs.embeddings):
            raise ValueError("a DFS-only search needs base_model or dfs.embeddings for the embeddings and head")
        return self

    def dfs_sources(self) -> list[str]:
        if self.dfs is None:
            return []
        if self.dfs.sources:
            return list(self.dfs.sources)
        return ([MERGE_SOURCE] if self.ps else []) + list(self.models)

    def model_refs(self) -> list[str]:
        return list(dict.fromkeys(([self.base_model] if self.base_model else []) + list(self.models)))


def _resolve(ref: str, base_dir: Path) -> str:
    """Relative paths in a config are relative to the config file's folder, wherever the command
    runs; both paths of a LoRA source (MODEL+ADAPTER)."""
    if ref == MERGE_SOURCE:
        return ref
    model, adapter = split_ref(ref)
    if adapter is not None:
        return f"{_resolve(model, base_dir)}+{_resolve(adapter, base_dir)}"
    p = Path(ref).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def parse_search_config(data: Any, base_dir: Path, where: str = "config") -> SearchConfig:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a YAML mapping (see search_spaces/ for examples)")
    cfg = validate(SearchConfig, data, where)
    mapping = {r: _resolve(r, base_dir) for r in cfg.model_refs()}
    update: dict[str, Any] = {"models": [mapping[m] for m in cfg.models]}
    if cfg.base_model:
        update["base_model"] = mapping[cfg.base_model]
    if cfg.dfs is not None:
        dfs_update = {}
        if cfg.dfs.sources:
            dfs_update["sources"] = [mapping.get(s, s) for s in cfg.dfs.sources]
        if cfg.dfs.embeddings:
            dfs_update["embeddings"] = mapping.get(cfg.dfs.embeddings, _resolve(cfg.dfs.embeddings, base_dir))
        update["dfs"] = cfg.dfs.model_copy(update=dfs_update)
    def resolved(cal: Calibration) -> Calibration:
        return cal.model_copy(update={"data": _resolve(cal.data, base_dir)}) if cal.data else cal

    if cfg.calibration is not None:
        update["calibration"] = resolved(cfg.calibration)
    if cfg.model_calibration:
        unknown = [m for m in cfg.model_calibration if m not in mapping]
        if unknown:
            raise UserError(f"{where}: model_calibration names {unknown[0]!r}, which is not one of the models")
        update["model_calibration"] = {mapping[m]: resolved(c) for m, c in cfg.model_calibration.items()}
    if cfg.tokenizer is not None:
        update["tokenizer"] = _resolved_tokenizer(cfg.tokenizer, mapping, base_dir)
    if cfg.fitness.task_path:
        update["fitness"] = cfg.fitness.model_copy(update={"task_path": _resolve(cfg.fitness.task_path, base_dir)})
    return cfg.model_copy(update=update)


def _resolved_tokenizer(section: TokenizerSection, mapping: dict, base_dir: Path) -> TokenizerSection:
    """The section with its model names resolved as the models are (union/base stay)."""
    ref = lambda r: r if r in ("union", "base") else mapping.get(r, _resolve(r, base_dir))  # noqa: E731
    tokens = None
    if section.tokens:
        tokens = {}
        for t, cfg in section.tokens.items():
            src = cfg.source
            src = ref(src) if isinstance(src, str) else (src.model_copy(update={"model": ref(src.model)}) if hasattr(src, "model") else src)
            tokens[t] = cfg.model_copy(update={"source": src})
    return section.model_copy(update={"source": ref(section.source), "tokens": tokens})


def load_search_config(path: str | Path) -> SearchConfig:
    path = Path(path)
    data = read_yaml(path, "search config")
    return parse_search_config(data, path.resolve().parent, where=str(path))


def config_to_yaml(cfg: SearchConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
