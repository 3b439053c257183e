"""The Python API: what the `evomerge` command does, as functions for notebooks and scripts.

    import evomerge
    evomerge.merge("recipe.yaml", "out/")                      # or a dict, or a Recipe
    evomerge.evaluate("out/", ["mir_test", "sft_test:logprob"]) # a model dir, or (model, tokenizer)
    run = evomerge.search("search_spaces/toy_ps.yaml")          # or a dict, or a SearchConfig
    run.best(), run.history(); evomerge.resume(run.path)

Your own fitness in place of lm-eval tasks: a function of the live candidate and its
tokenizer, returning a number (or a dict holding "fitness"; its other keys are kept as
scores). In a config, ``fitness: {function: "package.module:name"}``; from Python, any
callable, sent to the Ray workers by value:

    def neg_nll(model, tokenizer):                              # called under torch.no_grad()
        ids = tokenizer("a text the merge should know", return_tensors="pt").input_ids
        return -float(model(ids, labels=ids).loss)
    run = evomerge.search("search_spaces/toy_ps.yaml", fitness=neg_nll)
    evomerge.resume(run.path, fitness=neg_nll)                  # a callable run needs it again

The history keeps each value as ``scores["function"]["fitness"]`` (fitness/function.py).

Each is the library function the CLI calls, so a script and the command give the same
tensors, scores and run directories. Bad input raises ``evomerge.UserError`` with the
one-line message the command would print.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .fitness.env import set_offline_env, set_quiet_env

set_offline_env()  # before anything imports datasets or lm_eval
set_quiet_env()

from .errors import UserError  # noqa: E402
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402


def merge(recipe: str | Path | dict | Recipe, out_dir: str | Path, *, seed: int | None = None, device: str = "cpu",
          force: bool = False, progress: bool = False) -> Path:
    """Write the recipe's merge as a Hugging Face model directory; returns its path.

    A path is read as `evomerge merge` reads it (model paths also relative to the file); a
    dict or Recipe takes model paths as given."""
    from .merge.to_disk import merge_to_disk

    recipe_dir = None
    if isinstance(recipe, (str, Path)):
        recipe_dir, recipe = Path(recipe).resolve().parent, load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        raise UserError(f"recipe must be a path, a dict or a Recipe, not {type(recipe).__name__}")
    merge_to_disk(recipe, out_dir, recipe_dir=recipe_dir, device=device, seed=seed, force=force, progress=progress)
    return Path(out_dir)


def evaluate(model: str | Path | tuple, tasks: str | list[str], *, limit: float | None = None,
             task_path: str | None = None, batch_size: int = 64, device: str = "cpu", compute_dtype: str = "auto",
             metric: str = "acc", samples: dict[str, list[int]] | None = None):
    """Score a model dir (or a live ``(model, tokenizer)`` pair) on lm-eval tasks: a
    ``Result`` with ``.scores`` ({task: {metric: value}}) and ``.fitness`` (their weighted mean).
    ``tasks``: names as `evomerge eval --tasks` takes them (``task[:metric[:weight]]``);
    ``samples``: per task, the documents to score (a search run's subsets.json)."""
    from .fitness.evaluator import Evaluator
    from .fitness.terms import parse_terms

    spec = tasks if isinstance(tasks, str) else ",".join(tasks)
    evaluator = Evaluator(parse_terms(spec, metric=metric), task_path, limit, batch_size, device, samples=samples)
    if isinstance(model, tuple):
        live, tokenizer = model
        return evaluator.score_model(live, tokenizer)
    return evaluator.score_dir(model, compute_dtype)


@dataclass(frozen=True)
class Run:
    """A run directory, read as `evomerge export` and `evomerge report` read it (while the
    search goes on, too)."""

    path: Path

    def history(self) -> list[dict]:
        """One dict per evaluated candidate, in the order they finished (history.jsonl)."""
        from .run.rundir import RunDir

        return RunDir(self.path).read_history()

    def best(self) -> tuple[Recipe, dict]:
        """(the best recipe, its history entry): what `evomerge export` writes."""
        from .run.export import best_recipe
        from .run.rundir import RunDir

        return best_recipe(RunDir(self.path))

    def front(self) -> list[dict]:
        """The Pareto front of the fitness terms (history entries, best fitness first); any run has one."""
        from .run.front import pareto_front
        from .run.rundir import RunDir

        rd = RunDir(self.path)
        return pareto_front(rd.read_history(), rd.load_config())

    def pick(self, eval_id: int | None = None, weights: list[float] | None = None) -> tuple[Recipe, dict]:
        """(recipe, entry) of a candidate by eval id, or of the front member maximizing ``weights``."""
        from .run.export import best_recipe
        from .run.rundir import RunDir

        return best_recipe(RunDir(self.path), eval_id, weights)

    def results(self) -> dict | None:
        """The end-of-search table (sources, uniform merge, best found on the test tasks), once written."""
        import json

        path = self.path / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None


def search(config: str | Path | dict | Any, *, run_dir: str | Path | None = None, max_evals: int | None = None,
           workers: int | None = None, seed: int | None = None, ray_address: str | None = None,
           progress: bool = False, tensorboard: bool = False, fitness: Callable | None = None) -> Run:
    """Run a search to its end; returns its run. ``config``: a YAML path (relative model paths
    from its folder), a dict (relative paths from the working directory) or a SearchConfig.
    ``tensorboard``: also log it to RUN_DIR/tensorboard/ (needs ``evomerge[tracking]``).
    ``fitness``: ``fn(model, tokenizer) -> float | dict`` scoring every candidate in place of
    the config's fitness tasks or function (the frozen config records its module:qualname)."""
    from .run import search as runner
    from .space.config import SearchConfig, load_search_config, parse_search_config

    overrides = runner.Overrides(max_evals=max_evals, workers=workers, seed=seed, ray_address=ray_address)
    rd = str(run_dir) if run_dir is not None else None
    name, origin = "search", "search started from the Python API"
    if isinstance(config, (str, Path)):  # as `evomerge search CONFIG` starts it
        name, origin = Path(config).stem, f"search started from {config}"
        config = load_search_config(config)
    elif isinstance(config, dict):
        config = parse_search_config(config, Path.cwd())
    if not isinstance(config, SearchConfig):
        raise UserError(f"config must be a path, a dict or a SearchConfig, not {type(config).__name__}")
    if fitness is not None:
        config = _with_callable(config, fitness)
    return Run(Path(runner.start_config(config, name, rd, overrides, progress, origin, tensorboard, fitness)))


def _with_callable(config, fn: Callable):
    """The config scored by ``fn``: its tasks' document choices (limit, racing) go with them;
    task_path and batch_size stay for the test: tasks."""
    from .fitness.function import function_name
    from .space.config import FitnessConfig

    if not callable(fn):
        raise UserError(f"fitness must be a callable fn(model, tokenizer), not {type(fn).__name__}")
    old = config.fitness
    new = FitnessConfig(function=function_name(fn), by_value=True, batch_size=old.batch_size, task_path=old.task_path)
    return config.model_copy(update={"fitness": new})


def resume(run_dir: str | Path, *, max_evals: int | None = None, ray_address: str | None = None, progress: bool = False,
           tensorboard: bool = False, fitness: Callable | None = None) -> Run:
    """Continue a run after a crash or a stop (the same trajectory as an uninterrupted run);
    ``max_evals`` gives it a new budget; ``fitness``: the callable a run started with
    ``search(..., fitness=fn)`` needs again."""
    from .run import search as runner

    return Run(Path(runner.resume(str(run_dir), None, ray_address, progress=progress, max_evals=max_evals,
                                  tensorboard=tensorboard, fitness_fn=fitness)))
