"""Score models with lm-eval tasks, building the tasks once per evaluator.

``simple_evaluate`` rebuilds the task dict (and re-reads the data) on every call; the search
scores thousands of candidates, so an ``Evaluator`` loads its tasks once and calls
``lm_eval.evaluator.evaluate`` per model. The search writes each candidate's weights in
place into one model object, so the lm-eval wrapper (``HFLM``) around that object is kept
too and simply sees the new weights.
"""

from __future__ import annotations

from evomerge.fitness.env import set_offline_env

set_offline_env()  # before lm_eval pulls in datasets / huggingface_hub

import math  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from numbers import Real  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from lm_eval.evaluator import evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from evomerge.fitness.fast_lm import FastHFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from evomerge.errors import UserError, nearest  # noqa: E402
from evomerge.tasks import TASK_DIR  # noqa: E402
from evomerge.fitness.terms import FitnessTerm, Result, combine, scores_from_results  # noqa: E402

SUBSETS = ("first", "random")  # which documents a limit keeps
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def default_task_path() -> Path:
    """The shipped tasks (``evomerge/tasks/``, installed with the package)."""
    return TASK_DIR


class Evaluator:
    """lm-eval tasks loaded once; ``score_model`` / ``score_dir`` per candidate."""

    def __init__(
        self,
        terms: Iterable[FitnessTerm],
        task_path: str | Path | None = None,
        limit: int | float | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        limits: dict[str, int] | None = None,
        subset: str = "first",
        subset_seed: int = 0,
        samples: dict[str, list[int]] | None = None,
    ) -> None:
        """``limit`` documents per task (``limits``: per task), the first ones (lm-eval's
        ``--limit``) or, with ``subset="random"``, a seeded random subset of each task's
        documents: the same for every model scored, and representative of the whole split."""
        self.terms = list(terms)
        if not self.terms:
            raise UserError("no fitness terms; name at least one task, e.g. --tasks mir_search")
        self.task_path = Path(task_path) if task_path is not None else default_task_path()
        if not self.task_path.is_dir():
            raise UserError(f"task path {self.task_path} is not a directory; pass the folder holding the task YAMLs")
        self.limit = _check_limit(limit)
        self.limits = {k: _check_limit(v) for k, v in (limits or {}).items()}
        if subset not in SUBSETS:
            raise UserError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = device

        names = list(dict.fromkeys(t.task for t in self.terms))
        self._task_dict = self._load_tasks(names)
        for task in self._task_dict["tasks"].values():
            _reuse_requests(task)
        self._check_metrics()
        unknown = sorted(set(self.limits) - set(self._task_dict["tasks"]))
        if unknown:
            raise UserError(f"limits name {unknown[0]!r}, which is not one of the tasks scored ({', '.join(sorted(self._task_dict['tasks']))})")
        # per task: the documents scored (None: all of them), fixed once here, or given
        self.samples = self._subsets(subset, subset_seed) if samples is None else self._given(samples)
        self._lm: HFLM | None = None
        self._lm_model = None
        self._lm_tokenizer = None

    # ------------------------------------------------------------------ setup

    def _task_manager(self, names: list[str]) -> TaskManager:
        # Indexing lm-eval's ~15k built-in tasks takes seconds: only do it for names not found locally.
        tm = TaskManager(include_path=str(self.task_path), include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
        tm = TaskManager(include_path=str(self.task_path))
        for name in names:
            if name not in tm.all_tasks:
                raise UserError(
                    f"unknown task {name!r}{nearest(name, tm.all_tasks)}; "
                    f"tasks are looked up in {self.task_path} (--task-path) and lm-eval's own tasks"
                )
            if name in tm.all_tags:
                raise UserError(f"{name!r} is an lm-eval tag, which has no score of its own; name its tasks or a group")
        return tm

    def _load_tasks(self, names: list[str]) -> dict:
        tm = self._task_manager(names)
        # lm-eval refuses a task named both on its own and inside a named group; the group's
        # results carry the task's row anyway, so load groups first and skip their members.
        groups = [n for n in names if n in tm.all_groups]
        try:
            loaded = tm.load(groups) if groups else {"tasks": {}, "groups": {}, "group_map": {}}
            rest = [n for n in names if n not in groups and n not in loaded["tasks"]]
            if rest:
                more = tm.load(rest)
                for key in ("tasks", "groups", "group_map"):
                    loaded[key] = {**loaded.get(key, {}), **more.get(key, {})}
        except FileNotFoundError as e:
            raise UserError(f"task data not found: {str(e).splitlines()[0]}") from None
        return loaded

    def _produced_metrics(self, name: str) -> set[str]:
        """Metric names the results will carry for a task or group, as ``scores_from_results`` keys them."""
        tasks, groups = self._task_dict["tasks"], self._task_dict.get("groups", {})
        if name in tasks:
            task = tasks[name]
            filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
            pairs = [(m, f) for m in task.aggregation() for f in filters]
        else:
            aggs = groups[name].aggregate_metric_list or []
            pairs = [(a.metric, f) for a in aggs for f in (a.filter_list or ["none"])]
        return {m if f == "none" else f"{m},{f}" for m, f in pairs}

    def _check_metrics(self) -> None:
        for term in self.terms:
            produced = self._produced_metrics(term.task)
            if term.metric not in produced:
                raise UserError(
                    f"task {term.task!r} does not produce metric {term.metric!r}"
                    f"{nearest(term.metric, produced)}; it produces {sorted(produced)}"
                )

    def _given(self, samples: dict[str, list[int]]) -> dict[str, list[int]]:
        tasks = self._task_dict["tasks"]
        out = {}
        for name, docs in samples.items():
            if name not in tasks:
                continue  # a run's subsets name its fitness tasks; score what is asked
            n = len(tasks[name].eval_docs)
            if any(not 0 <= i < n for i in docs):
                raise UserError(f"the subset for {name!r} names documents outside its {n}; was it written for other task data?")
            out[name] = sorted(set(int(i) for i in docs))
        return {**{n: list(range(len(t.eval_docs))) for n, t in tasks.items()}, **out}

    def _subsets(self, subset: str, seed: int) -> dict[str, list[int]] | None:
        if self.limit is None and not self.limits:
            return None
        out = {}
        for name, task in self._task_dict["tasks"].items():
            n = len(task.eval_docs)
            size = _size(self.limits.get(name, self.limit), n)
            if size is None or size >= n:
                out[name] = list(range(n))
            elif subset == "first":
                out[name] = list(range(size))
            else:
                # a generator of its own per task, keyed by the task's name: adding a task
                # leaves the others' subsets alone
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                out[name] = sorted(int(i) for i in rng.choice(n, size, replace=False))
        return out

    @property
    def documents(self) -> int:
        """Documents scored per model, over all tasks."""
        if self.samples is None:
            return sum(len(t.eval_docs) for t in self._task_dict["tasks"].values())
        return sum(map(len, self.samples.values()))

    # ---------------------------------------------------------------- scoring

    def _lm_for(self, model, tokenizer) -> HFLM:
        # HFLM reads weights through the model object at every forward pass, so one wrapper
        # serves every weight set written into that object; a new model object of the same
        # kind (a DFS view) is swapped in rather than wrapped anew.
        if self._lm is None or self._lm_tokenizer is not tokenizer or type(self._lm_model) is not type(model):
            self._lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            self._lm_tokenizer = tokenizer
        elif self._lm_model is not model:
            self._lm._model = model
        self._lm_model = model
        return self._lm

    def score_model(self, model, tokenizer) -> Result:
        """Score a model object already in memory (its current weights)."""
        if tokenizer is None:
            raise UserError("score_model needs the model's tokenizer")
        out = evaluate(
            lm=self._lm_for(model, tokenizer),
            task_dict=self._task_dict,
            samples=self.samples,
            bootstrap_iters=0,
            log_samples=False,
        )
        scores = scores_from_results(out["results"])
        return Result(scores=scores, fitness=combine(self.terms, scores))

    def score_dir(self, path: str | Path, compute: str | None = "auto") -> Result:
        """Load a Hugging Face model dir (with its tokenizer) and score it.

        ``compute``: the forward passes' dtype, by the same rule as the search's workers
        (evomerge/dtypes.py), so a search's export scores what the search saw."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.dtypes import compute_dtype
        from evomerge.io.model_dir import ModelDir

        path = Path(path)
        check_model_dir(path)
        stored = [e.dtype for e in ModelDir(path).entries.values() if e.dtype.is_floating_point]
        dtype = compute_dtype(compute, self.device, max(set(stored), key=stored.count))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        return self.score_model(model, tokenizer)


def evaluators_for(cfg, device: str = "cpu", test: bool = True, function=None) -> dict[str, Evaluator]:
    """A search config's evaluators: "search" (its fitness, on its subsets), "test" (whole splits) and,
    with fitness.confirm, "confirm" (the fitness on whole splits).
    ``function``: the callable given to evomerge.search(fitness=...), for a config whose
    fitness.function records it (fitness/function.py)."""
    fit = cfg.fitness
    out = {"search": _search_evaluator(fit, device, function)}
    if fit.racing is not None:
        from evomerge.fitness.racing import racing_samples

        first, rest = racing_samples(out["search"], fit.racing.first, fit.subset_seed)
        for name, samples in (("search_first", first), ("search_rest", rest)):
            out[name] = Evaluator(out["search"].terms, fit.task_path, None, fit.batch_size, device, samples=samples)
    if fit.confirm:  # the same terms on every document (run/confirm.py)
        out["confirm"] = Evaluator(out["search"].terms, fit.task_path, None, fit.batch_size, device)
    if cfg.test and test:
        out["test"] = Evaluator([FitnessTerm(t.task, t.metric, t.weight) for t in cfg.test], fit.task_path, None, fit.batch_size, device)
    return out


def _search_evaluator(fit, device: str, function):
    if fit.function is not None:
        from evomerge.fitness.function import FunctionEvaluator, function_for

        return FunctionEvaluator(function_for(fit, function), fit.function)
    return Evaluator([FitnessTerm(t.task, t.metric, t.weight) for t in fit.tasks], fit.task_path, fit.limit,
                     fit.batch_size, device, limits=fit.limits, subset=fit.subset, subset_seed=fit.subset_seed)


def _reuse_requests(task) -> None:
    """Build a task's requests, and read its documents, on the first evaluation only.

    ``evaluate`` rebuilds every request from the documents on each call and re-reads each
    document from the dataset to score it, which together cost more than a tiny model's
    forward passes; neither depends on the weights, so later calls get the same instances
    (responses cleared) and the same documents.
    """
    build, iterate = task.build_all_requests, task.doc_iterator
    built: dict = {}
    docs: dict = {}

    def build_once(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in built:
            build(*args, **kwargs)
            built[key] = list(task._instances)
        for instance in built[key]:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = list(built[key])

    def iterate_once(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in docs:
            docs[key] = list(iterate(**kwargs))
        return iter(docs[key])

    task.build_all_requests = build_once
    task.doc_iterator = iterate_once


def check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model dir (no config.json); pass a dir written by save_pretrained")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files of its base model into it"
        )


def _size(limit: int | float | None, n: int) -> int | None:
    """Documents a limit keeps of ``n`` (lm-eval's rule: a fraction rounds up)."""
    if limit is None:
        return None
    return math.ceil(n * limit) if isinstance(limit, float) else int(limit)


def _check_limit(limit: int | float | None) -> int | float | None:
    """lm-eval's convention: an int counts docs per task, a float below 1 is a fraction."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, Real):
        raise UserError(f"limit must be a number, got {limit!r}")
    if isinstance(limit, float) and limit.is_integer():
        limit = int(limit)
    if isinstance(limit, int) and limit >= 1 or isinstance(limit, float) and 0 < limit < 1:
        return limit
    raise UserError(f"limit must be a count >= 1 or a fraction in (0, 1), got {limit!r}")
