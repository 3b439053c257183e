"""The search loop: ask a generation, score it on the pool, tell, checkpoint.

One code path for fresh and resumed runs. Every random draw belongs to the
optimizer, whose full state is checkpointed after each generation; candidate
ids are (generation, index), so after a crash the re-asked generation is the
same, candidates already in the history are taken from it, and those in
flight are run again. The loop never touches tensors.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fitness.function import check_resume
from ..io.lora import split_ref
from ..io.model_dir import open_model
from ..merge.kernels import get_kernel
from ..io.writer import atomic_write_text
from ..optim.registry import make_optimizer
from ..progress import progress_bar
from ..recipe import MERGE_SOURCE
from ..space.codec import SearchSpace
from ..space.config import SearchConfig, load_search_config
from ..workers.pool import make_pool
from .final import format_table, score_table
from .front import front_json, front_table, objectives, pareto_front
from .liveness import hold
from .confirm import confirmed_best, finalists
from .racing import race_for, scored_in_full
from .rundir import RunDir
from .tracking import Tracker, summary_writer

MAX_ATTEMPTS = 3  # a candidate that fails this often is recorded as failed and the search goes on


@dataclass
class Overrides:
    max_evals: int | None = None
    workers: int | None = None
    seed: int | None = None
    ray_address: str | None = None


def apply_overrides(cfg: SearchConfig, o: Overrides) -> SearchConfig:
    opt = cfg.optimizer.model_copy(update={k: v for k, v in (("max_evals", o.max_evals), ("seed", o.seed)) if v is not None})
    workers = cfg.workers.model_copy(update={"count": o.workers} if o.workers is not None else {})
    if o.max_evals is not None and o.max_evals < 1:
        raise UserError("--max-evals must be >= 1")
    if o.workers is not None and o.workers < 0:
        raise UserError("--workers must be >= 0 (0 runs in this process without Ray)")
    return cfg.model_copy(update={"optimizer": opt, "workers": workers})


def with_lookahead(cfg: SearchConfig) -> SearchConfig:
    """The config with its lookahead settled, frozen into the run (a resume with other workers
    keeps it, so the trajectory does not depend on them). auto: one and a half times as many
    as the other workers (W - 1 + (W - 1) // 2), so none idles while a generation's last
    candidate runs: with evaluation times that vary, a worker finishes its first candidate
    drawn ahead before the slowest of the generation ends, and W - 1 alone left 2 % of the
    workers' time idle at generation ends (bench/RESULTS.md, sixth session); at most three
    quarters of the population (the rest is drawn from the distribution told the last
    generation); 0 without Ray workers, or for a backend that cannot draw ahead."""
    o, count = cfg.optimizer, cfg.workers.count
    if o.lookahead is not None:
        if o.lookahead >= o.popsize:
            raise UserError(f"optimizer.lookahead {o.lookahead} must be below popsize {o.popsize}")
        return cfg
    from ..optim.registry import OPTIMIZERS

    backend = OPTIMIZERS.get(o.backend)
    others, cap = count - 1, o.popsize - math.ceil(o.popsize / 4)
    auto = min(others + others // 2, cap) if count >= 2 and backend is not None and backend.supports_ahead else 0
    return cfg.model_copy(update={"optimizer": o.model_copy(update={"lookahead": auto})})


# A budget of this many generations or fewer leaves CMA-ES too few updates to adapt its
# distribution: at 64 evaluations it beat random search on the objective on each of toy zoo
# seeds 0-4 with popsize 13 and 8 (4.9 and 8 generations), not with 16 (4 generations)
# (bench/RESULTS.md, twelfth session).
FEW_CMA_GENERATIONS = 4


def budget_note(cfg: SearchConfig) -> str | None:
    """One line of advice when the budget leaves CMA-ES FEW_CMA_GENERATIONS generations or fewer."""
    o = cfg.optimizer
    if o.backend != "cma" or o.max_evals > FEW_CMA_GENERATIONS * o.popsize:
        return None
    fits = (o.max_evals - 1) // FEW_CMA_GENERATIONS  # the largest popsize with more generations than that
    fix = (f"set optimizer.popsize to {fits} or less, or " if fits >= 2 else "") + \
        f"raise --max-evals above {FEW_CMA_GENERATIONS * o.popsize}"
    return (f"note: {o.max_evals} evaluations at popsize {o.popsize} are {o.max_evals / o.popsize:.3g} CMA-ES generations, "
            f"too few to adapt its search (it may do no better than random search); {fix}")


def build_space(cfg: SearchConfig) -> SearchSpace:
    """Open every source's header (cheap) to check it and count its layers."""
    loras = [ref for ref in cfg.model_refs() if split_ref(ref)[1] is not None]
    _check_lora_sources(cfg, loras)
    for ref in cfg.model_refs():
        for path in filter(None, split_ref(ref)):
            if not Path(path).exists():
                hint = "; build the toy family first with `evomerge zoo build`" if "zoo" in Path(path).parts else ""
                raise UserError(f"model directory {path} does not exist{hint}")
    dirs = {ref: open_model(ref) for ref in cfg.model_refs()}
    first = next(iter(dirs.values()))
    _check_tokenizer(cfg)
    for ref, d in dirs.items():
        if d.arch.model_type != first.arch.model_type or (cfg.tokenizer is None and d.arch.vocab_size != first.arch.vocab_size):
            raise UserError(f"{ref} ({d.arch.model_type}, vocab {d.arch.vocab_size}) does not match "
                            f"{first.path} ({first.arch.model_type}, vocab {first.arch.vocab_size}); search over one model family"
                            + ("" if d.arch.model_type != first.arch.model_type else
                               ", or give the config a tokenizer: section (source: union) to re-index their rows"))
    return SearchSpace(cfg, {ref: d.arch.num_layers for ref, d in dirs.items()})


def _check_tokenizer(cfg: SearchConfig) -> None:
    """A tokenizer: section re-indexes the parameter-space merge's embedding and head rows;
    a data-flow path reading a model's own embeddings, or per-row statistics, would not follow."""
    if cfg.tokenizer is None:
        return
    if cfg.ps is None or (cfg.dfs is not None and cfg.dfs.embeddings not in (None, MERGE_SOURCE)):
        raise UserError("a tokenizer: section re-indexes the parameter-space merge's rows: give the search a ps space "
                        "and leave dfs.embeddings to the merge")
    if get_kernel(cfg.ps.method).stats:
        raise UserError(f"{cfg.ps.method}'s statistics are per row of each model's own vocabulary; it does not combine "
                        "with a tokenizer: section")


def _check_lora_sources(cfg: SearchConfig, loras: list[str]) -> None:
    """LoRA sources take part in parameter-space merges: a worker holds their factors beside
    the resident model and merges them in per tensor (workers/resident.py). A data-flow path
    runs a source's own blocks, and statistics are computed on whole models: not for them yet."""
    if not loras:
        return
    routed = [ref for ref in cfg.dfs_sources() if ref in loras]
    home = cfg.base_model or cfg.models[0]
    if routed or (cfg.dfs is not None and cfg.dfs.embeddings in loras):
        raise UserError(f"{(routed or loras)[0]}: a LoRA source cannot be a data-flow source (its blocks would be a whole "
                        "fine-tune); list it in models for the parameter space only, or merge the adapter first")
    if home in loras:
        raise UserError(f"{home}: the search's home model (base_model, else the first model) must be a model directory, "
                        "not a LoRA source; set base_model to the adapter's model")
    if cfg.ps is not None and get_kernel(cfg.ps.method).stats:
        raise UserError(f"{loras[0]}: {cfg.ps.method} needs statistics of whole models, which LoRA sources do not have yet; "
                        "merge the adapter first")


def new_optimizer(cfg: SearchConfig, space: SearchSpace):
    o = cfg.optimizer
    return make_optimizer(o.backend, space.dim, seed=o.seed, popsize=o.popsize, sigma0=o.sigma0,
                          x0=space.default_x0(), objectives=len(cfg.fitness.tasks))


def check_plan(space: SearchSpace) -> None:
    """Plan the starting recipe over the sources' headers: what every candidate shares (tied
    heads, shapes, dtypes, the routed layout) fails here, before a worker starts or a file is written."""
    from ..io import vocab
    from ..merge.materialize import plan
    from ..merge.prepare import prepare
    from ..merge.to_disk import open_sources

    recipe = space.decode(space.default_x0())
    opened = open_sources(recipe)
    # for a data-dependent method this computes the statistics, once, into the cache the
    # workers then read
    plan(*prepare(recipe, opened), vocab=vocab.build(recipe, opened))


def check_tasks(cfg: SearchConfig, fitness_fn=None) -> dict | None:
    """Load the fitness tasks (or import the fitness function) once here, so a bad name fails
    before any worker starts; returns the documents the fitness scores per task (None: every
    document, or a function)."""
    from ..fitness.evaluator import evaluators_for

    return evaluators_for(cfg, function=fitness_fn)["search"].samples


def start(config_path: str, run_dir: str | None, overrides: Overrides, progress: bool = True,
          tensorboard: bool = False) -> Path:
    return start_config(load_search_config(config_path), Path(config_path).stem, run_dir, overrides, progress,
                        f"search started from {config_path}", tensorboard)


def start_config(cfg: SearchConfig, default_name: str, run_dir: str | None, overrides: Overrides, progress: bool = True,
                 origin: str = "search started", tensorboard: bool = False, fitness_fn=None) -> Path:
    """A new run of ``cfg`` (a loaded config: from a file, or the Python API's dict);
    ``tensorboard``: also log it to RUN_DIR/tensorboard/ (run/tracking.py); ``fitness_fn``:
    the callable a by_value fitness.function names (evomerge.search(fitness=fn))."""
    if tensorboard:
        summary_writer()  # a missing package fails before anything runs
    cfg = with_lookahead(apply_overrides(cfg, overrides))
    rd = RunDir(run_dir or Path("runs") / (cfg.name or default_name))
    if rd.path.exists() and any(rd.path.iterdir()):
        raise UserError(f"run directory {rd.path} already exists; resume it with `evomerge resume {rd.path}` or pass another --run-dir")
    space = build_space(cfg)
    check_plan(space)
    new_optimizer(cfg, space)  # a bad backend or budget fails here, before the run dir exists
    samples = check_tasks(cfg, fitness_fn)
    pool = _make_pool(cfg, overrides.ray_address, fitness_fn)  # GPUs and CPUs are checked before anything is written
    try:
        rd.create(cfg)
        if samples is not None:
            atomic_write_text(rd.subsets, json.dumps(samples, indent=0, sort_keys=True) + "\n")
    except BaseException:
        pool.close()
        raise
    with hold(rd.path):
        rd.log(origin)
        note = budget_note(cfg)
        if note:
            rd.log(note)
            if progress:
                print(f"evomerge: {note}", file=sys.stderr)
        return run(rd, overrides.ray_address, progress, pool, tensorboard)


def _make_pool(cfg: SearchConfig, ray_address: str | None, fitness_fn=None):
    w = cfg.workers
    return make_pool(cfg.model_dump(mode="json"), w.count, w.gpus_per_worker, w.cpus_per_worker, ray_address, fitness_fn)


def resume(run_dir: str, config_path: str | None = None, ray_address: str | None = None, progress: bool = True,
           max_evals: int | None = None, tensorboard: bool = False, fitness_fn=None) -> Path:
    """Continue a run; ``max_evals`` raises (or lowers, down to what is done) its budget;
    ``fitness_fn``: the callable it was started with (evomerge.resume(fitness=fn))."""
    if tensorboard:
        summary_writer()  # a missing package fails before anything runs
    rd = RunDir(run_dir)
    cfg = rd.load_config()
    check_resume(cfg.fitness, fitness_fn)
    with hold(rd.path):  # before anything is written: a second driver of a live run stops here
        return _resume(rd, cfg, config_path, ray_address, progress, max_evals, tensorboard, fitness_fn)


def _resume(rd: RunDir, cfg: SearchConfig, config_path: str | None, ray_address: str | None, progress: bool,
            max_evals: int | None, tensorboard: bool, fitness_fn=None) -> Path:
    if max_evals is not None and max_evals != cfg.optimizer.max_evals:
        cfg = _new_budget(rd, cfg, max_evals)
    if config_path is not None:
        new = load_search_config(config_path)
        # CLI overrides frozen into the run are not a change of config
        new = new.model_copy(update={"optimizer": new.optimizer.model_copy(update={"max_evals": cfg.optimizer.max_evals, "seed": cfg.optimizer.seed}),
                                     "workers": cfg.workers})
        if new != cfg:
            diff = _diff(cfg.model_dump(mode="json"), new.model_dump(mode="json"))
            raise UserError(f"{config_path} differs from the run's frozen config ({'; '.join(diff[:4])}); start a new run for a new config")
    rd.log("resumed")
    return run(rd, ray_address, progress, tensorboard=tensorboard, fitness_fn=fitness_fn)


def _new_budget(rd: RunDir, cfg: SearchConfig, max_evals: int) -> SearchConfig:
    """The frozen config with another max_evals, written before anything else runs."""
    pop = cfg.optimizer.popsize
    done = len(rd.read_history())
    if max_evals < max(done, 1):
        raise UserError(f"--max-evals {max_evals} is below the {done} evaluations this run has done; pass at least {done}")
    ckpt = rd.load_checkpoint()
    told = (ckpt or {}).get("generation", 0) * pop
    if max_evals < told:
        raise UserError(f"--max-evals {max_evals} is below the {told} evaluations already told to the optimizer")
    new = cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"max_evals": max_evals})})
    rd.write_config(new)
    rd.log(f"max_evals {cfg.optimizer.max_evals} -> {max_evals}")
    return new


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def run(rd: RunDir, ray_address: str | None = None, progress: bool = True, pool=None, tensorboard: bool = False,
        fitness_fn=None) -> Path:
    cfg = rd.load_config()
    search = _Search(rd, cfg, pool or _make_pool(cfg, ray_address, fitness_fn), progress, tensorboard)
    try:
        while search.opt.generation < search.generations and not search.stop_early():
            search.generation()
        search.drain()
        search.confirm()
        search.finish()
    finally:
        search.close()
    return rd.path


class _Search:
    """The state of one search between generations, rebuilt from the run dir on resume."""

    def __init__(self, rd: RunDir, cfg: SearchConfig, pool, progress: bool, tensorboard: bool = False):
        self.rd, self.cfg, self.pool, self.progress = rd, cfg, pool, progress
        self.space = build_space(cfg)
        o = cfg.optimizer
        self.opt = new_optimizer(cfg, self.space)
        ckpt = rd.load_checkpoint()
        if ckpt is not None:
            self.opt.load_state_dict(ckpt["optimizer"])
        history = rd.read_history()
        self.history = history  # every entry so far, this session's appended as they come
        self.done = {e["eval_id"]: e for e in history}  # scored before a crash, by candidate id
        full = [e for e in history if scored_in_full(e)]
        self.cache = {e["recipe_hash"]: e for e in full}
        self.best = max(full, key=lambda e: e["fitness"], default=None)
        self.generations = math.ceil(o.max_evals / o.popsize)
        self.elapsed_before = (ckpt or {}).get("elapsed_s", 0.0)  # search time of earlier sessions
        self.started = time.monotonic()
        total = self.generations * o.popsize
        self.bar = progress_bar(total=total, initial=min(len(self.done), total), desc="search", unit="cand",
                        disable=not progress, dynamic_ncols=True)
        self.lookahead = o.lookahead or 0  # None in runs from before asking ahead: 0, as they ran
        if self.lookahead and not self.opt.supports_ahead:
            raise UserError(f"optimizer.lookahead {self.lookahead}: backend {o.backend} cannot draw a generation ahead "
                            "(cma and random can); set lookahead: 0")
        self.waiting: dict[str, list[tuple[int, int, np.ndarray]]] = {}  # recipe hash -> candidates sharing it
        self.recipes: dict[str, tuple[dict, dict | None]] = {}  # recipe hash -> (recipe, race) as submitted
        self.held: dict[int, dict[int, tuple]] = {}  # a later generation's results, until it starts
        self.confirmed: list[dict] = []  # fitness.confirm's finalists, once scored (confirm())
        self.tracker = Tracker(rd.path) if tensorboard else None  # last: nothing after it can fail and leave it open

    def generation(self) -> None:
        """Ask, score every new recipe once (as workers free up), tell, checkpoint.

        With ``lookahead`` L, the next generation's first L genomes are drawn with this one
        (optim/base.py ask_ahead) and queued behind it, so workers this generation leaves idle
        at its end already score them; their results join the history when their generation
        starts, so the history never depends on timing (a kill -9 at any moment resumes to
        the uninterrupted run's). Each candidate races against the bar of the generation
        whose distribution drew it."""
        gen, pop = self.opt.generation, self.cfg.optimizer.popsize
        genomes = self.opt.ask()
        ahead = self.opt.ask_ahead(self.lookahead if gen + 1 < self.generations else 0)
        entries: list[dict | None] = [None] * len(genomes)
        held = self.held.pop(gen, {})
        for i, x in enumerate(genomes):
            eval_id = gen * pop + i
            if eval_id in self.done and np.allclose(self.done[eval_id]["genome"], x, atol=1e-12):
                entries[i] = self.done[eval_id]
            elif i in held:
                entries[i] = self._record(gen, i, *held[i])
                self._improve_if_full(entries[i])
            else:
                entries[i] = self._queue(gen, i, x, drawn=gen - 1 if i < self.lookahead and gen > 0 else gen)
        for j, x in enumerate(ahead):
            if (gen + 1) * pop + j not in self.done:
                self._queue(gen + 1, j, x, drawn=gen)
        while any(e is None for e in entries):
            for g, i, entry in self._next_outcome(gen):
                entries[i] = entry
        if self.best is None and all(e["error"] for e in entries):
            # nothing has ever scored: the config, not one candidate, is at fault
            raise UserError(f"every candidate of generation {gen} failed, the first with: {entries[0]['error']}; "
                            "fix the search config (errors per candidate are in history.jsonl)")
        # failed candidates tell the optimizer NaN, which it maps to the worst value seen
        vectors = None
        if self.opt.multi_objective:
            nan = [float("nan")] * len(self.cfg.fitness.tasks)
            vectors = [objectives(e, self.cfg) or nan for e in entries]
        self.opt.tell(genomes, [e["fitness"] if e["fitness"] is not None else float("nan") for e in entries], vectors)
        if self.opt.multi_objective:
            self._write_front()
        self.rd.save_checkpoint({"optimizer": self.opt.state_dict(), "generation": self.opt.generation,
                                 "elapsed_s": self.elapsed()})
        if self.tracker is not None:  # after the checkpoint: a crash may drop this point, never log it twice
            self.tracker.generation(gen, entries, self.best)
        self.rd.log(f"generation {gen} done: best {self.best['fitness'] if self.best else None}")

    def _queue(self, gen: int, i: int, x, drawn: int) -> dict | None:
        """Candidate (gen, i): recorded at once when its recipe is scored already (None for
        the next generation's, held), else queued to a worker or joined to the same recipe
        in flight. ``drawn``: the generation whose distribution drew it (its racing bar)."""
        recipe = self.space.decode(x)
        h = recipe.hash()
        if h in self.cache:
            hit = self.cache[h]
            result = {"scores": hit["scores"], "fitness": hit["fitness"]}
            if gen > self.opt.generation:
                self.held.setdefault(gen, {})[i] = (x, h, result, None, True)
                return None
            return self._record(gen, i, x, h, result, None, cached=True)
        if h not in self.waiting:
            racing = self.cfg.fitness.racing
            race = race_for(self.history, drawn, racing) if racing is not None else None
            self.recipes[h] = (recipe.to_dict(), race)
            self.pool.submit((h, 1), self.recipes[h][0], "search", race)
        slots = self.waiting.setdefault(h, [])
        if not any((g, j) == (gen, i) for g, j, _ in slots):  # drawn ahead and still running: once
            slots.append((gen, i, x))
        return None

    def _next_outcome(self, gen: int) -> list[tuple[int, int, dict | None]]:
        """One worker's outcome: every candidate of this generation sharing its recipe,
        recorded as (gen, i, entry); the next generation's are held for its start."""
        out = self.pool.next_outcome()
        h, attempt = out.tag
        if out.result is None and out.retry and attempt < MAX_ATTEMPTS:
            self.rd.log(f"generation {gen}: candidate {h} failed ({out.error}); running it again")
            self.pool.submit((h, attempt + 1), self.recipes[h][0], "search", self.recipes[h][1])
            return []
        result, error = out.result or {}, out.error
        if result.get("fitness") is not None and not math.isfinite(result["fitness"]):
            error = f"non-finite fitness {result['fitness']}"
            result = {**result, "fitness": None}
        recorded = []
        for n, (g, i, x) in enumerate(self.waiting.pop(h)):
            if g > gen:
                self.held.setdefault(g, {})[i] = (x, h, result, error, n > 0)
            else:
                recorded.append((g, i, self._record(g, i, x, h, result, error, cached=n > 0)))
        if recorded:
            self._improve_if_full(recorded[0][2])
        return recorded

    def _improve_if_full(self, entry: dict) -> None:
        if scored_in_full(entry):
            self._improve(entry)

    def drain(self) -> None:
        """Candidates drawn ahead for a generation that will not run (an early stop): let
        them finish, unrecorded, so the pool is free for the test split."""
        while self.pool.pending:
            self.pool.next_outcome()
        self.waiting.clear()

    def confirm(self) -> None:
        """fitness.confirm N: the finalists scored on every document, the best of them there made
        the run's best (run/confirm.py); skipped when confirmed.json already holds these finalists."""
        n = self.cfg.fitness.confirm
        if not n or self.best is None:
            return
        chosen = finalists(self.history, n)
        done = self.rd.read_confirmed()
        if done is None or [c["eval_id"] for c in done] != [e["eval_id"] for e in chosen]:
            recipes = {e["eval_id"]: self.space.decode(np.array(e["genome"])).to_dict() for e in chosen}
            for eval_id, recipe in recipes.items():
                self.pool.submit(("confirm", eval_id, 1), recipe, "confirm")
            got = {}
            while self.pool.pending:
                out = self.pool.next_outcome()
                _, eval_id, attempt = out.tag
                if out.result is None and out.retry and attempt < MAX_ATTEMPTS:
                    self.pool.submit(("confirm", eval_id, attempt + 1), recipes[eval_id], "confirm")
                    continue
                got[eval_id] = out
            done = [{"eval_id": e["eval_id"], "recipe_hash": e["recipe_hash"], "subset_fitness": e["fitness"],
                     "fitness": (got[e["eval_id"]].result or {}).get("fitness"),
                     "scores": (got[e["eval_id"]].result or {}).get("scores"), "error": got[e["eval_id"]].error}
                    for e in chosen]
            atomic_write_text(self.rd.confirmed, json.dumps({"count": n, "finalists": done}, indent=1) + "\n")
        best = confirmed_best(self.history, done)
        if best is None:
            return
        self.best = best
        atomic_write_text(self.rd.best, self.space.decode(np.array(best["genome"])).to_yaml())
        self.confirmed = done
        whole = next(c["fitness"] for c in done if c["eval_id"] == best["eval_id"])
        self.rd.log(f"confirmed on every document: eval {best['eval_id']} best of {len(done)} finalists ({whole:.4f})")

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def stop_early(self) -> bool:
        """Whether the config's patience or wall-time budget ends the run here (a generation's end).

        Patience reads only the history, so a resumed run stops where an uninterrupted one
        would; the wall-time budget is the one stop that depends on the machine."""
        o, gen = self.cfg.optimizer, self.opt.generation
        why = None
        if o.patience is not None and self.best is not None and gen - 1 - self.best["generation"] >= o.patience:
            why = f"no improvement for {gen - 1 - self.best['generation']} generations (patience {o.patience})"
        elif o.max_wall_s is not None and self.elapsed() >= o.max_wall_s:
            why = f"search time {self.elapsed():.0f} s reached max_wall_s {o.max_wall_s:g}"
        if why:
            self.rd.log(f"stopped after generation {gen - 1}: {why}")
            if self.progress:
                self.bar.write(f"stopped early: {why}")
        return why is not None

    def _record(self, gen: int, i: int, genome, h: str, result: dict, error: str | None, cached: bool) -> dict:
        entry = {"eval_id": gen * self.cfg.optimizer.popsize + i, "generation": gen, "genome": [float(v) for v in genome],
                 "recipe_hash": h, "scores": result.get("scores"), "fitness": result.get("fitness"),
                 "wall_s": 0.0 if cached else result.get("wall_s", 0.0), "merge_s": None if cached else result.get("merge_s"),
                 "eval_s": None if cached else result.get("eval_s"), "forward_s": None if cached else result.get("forward_s"),
                 "worker": None if cached else result.get("worker"), "error": error, "cached": cached,
                 "docs": 0 if cached else result.get("docs")}
        if result.get("stage") is not None:  # raced: how far it went, and its first stage's fitness
            entry["stage"], entry["first_fitness"] = result["stage"], result["first_fitness"]
        self.rd.append(entry)
        self.history.append(entry)
        if self.tracker is not None:
            self.tracker.candidate(entry)
        self.bar.update(1)
        return entry

    def _improve(self, entry: dict) -> None:
        self.cache[entry["recipe_hash"]] = entry
        if self.best is None or entry["fitness"] > self.best["fitness"]:
            self.best = entry
            atomic_write_text(self.rd.best, self.space.decode(np.array(entry["genome"])).to_yaml())
            self.bar.set_postfix(gen=entry["generation"], best=f"{entry['fitness']:.4f}")

    def _write_front(self) -> list[dict]:
        front = pareto_front(self.history, self.cfg)  # every entry so far, held since start-up
        atomic_write_text(self.rd.front, json.dumps(front_json(front, self.cfg), indent=1) + "\n")
        return front

    def finish(self) -> None:
        """The summary line and, when the config names test tasks, the comparison table."""
        utilization = self.pool.usage.utilization(self.pool.size)
        self.bar.close()
        if self.best is None:
            raise UserError("every candidate failed; see the errors in history.jsonl")
        rd, best = self.rd, self.best
        whole = next((c["fitness"] for c in self.confirmed if c["eval_id"] == best["eval_id"]), None)
        on_all = "" if whole is None else f" ({whole:.4f} on every document, best of {len(self.confirmed)} finalists)"
        summary = (f"best fitness {best['fitness']:.4f} at eval {best['eval_id']}{on_all}; "
                   f"worker utilization {utilization:.1%}; best recipe: {rd.best}")
        rd.log(summary)
        if self.progress:
            print(summary)
        if self.opt.multi_objective:
            front = self._write_front()
            rd.log(f"Pareto front: {len(front)} candidates, in front.json")
            if self.progress:
                print(f"Pareto front on the search tasks ({len(front)}; export one with `evomerge export {rd.path} --pick EVAL`):")
                print(front_table(front, self.cfg))
        if self.cfg.test:
            # the search split too: the report sets each source's fitness beside the best found's
            order, by_split = score_table(self.pool, self.cfg, self.space.decode(np.array(best["genome"])), ("test", "search"))
            results = by_split["test"]
            table = format_table(self.cfg, order, results)
            atomic_write_text(rd.results, f"# {rd.path.name}: test split\n\n{table}\n\n{summary}\n")
            atomic_write_text(rd.path / "results.json", json.dumps(
                {"rows": results, "search_rows": by_split["search"], "utilization": utilization,
                 "best_eval_id": best["eval_id"]}, indent=1))
            rd.log("test-split table written to results.md")
            if self.progress:
                print(table)
        if self.tracker is not None:
            self.tracker.finish(best, len(self.history), table if self.cfg.test else None)

    def close(self) -> None:
        self.bar.close()
        if self.tracker is not None:
            self.tracker.close()
        self.pool.close()
