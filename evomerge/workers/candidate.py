"""One worker's job: turn a recipe into a live model and score it.

Built once per worker: the resident sources, one preallocated candidate model
(PS merges are written into its parameters in place), the tokenizer, and the
fitness evaluator with its lm-eval tasks (or the fitness function, imported here).
A routed (DFS) candidate is the folded checkpoint export writes, built over the
resident blocks (workers/routed.py).
Everything runs in the compute dtype (float32 on a CPU), holding exactly the values
`evomerge merge` writes in the output dtype.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch

from ..fitness.env import set_offline_env

set_offline_env()

from ..errors import UserError  # noqa: E402
from ..fitness.racing import combine_stages  # noqa: E402
from ..io import vocab  # noqa: E402
from ..fitness.terms import Result, combine  # noqa: E402
from ..merge.kernels import get_kernel  # noqa: E402
from ..merge.materialize import compute, load, plan  # noqa: E402
from ..merge.prepare import stats_sources  # noqa: E402
from ..recipe import MERGE_SOURCE, Recipe, parse_recipe  # noqa: E402
from ..space.config import SearchConfig  # noqa: E402
from .magnitudes import SortedMagnitudes  # noqa: E402
from .resident import ResidentLora, ResidentModel  # noqa: E402
from .routed import RoutedBuilder  # noqa: E402


class CandidateWorker:
    """A worker whose start-up never raises: a failure (a NaN in a source, a broken tokenizer)
    is kept and reported by ``ping``, so the driver can say it in one line and close the pool
    (Ray hands a driver only the text of an exception raised while an actor starts)."""

    def __init__(self, config: dict, device: str = "cpu", worker_id: int = 0, fitness_fn=None):
        """``fitness_fn``: the callable given to evomerge.search(fitness=...), else None."""
        self.worker_id = worker_id
        self.startup_error: str | None = None
        try:
            self._start(config, device, fitness_fn)
        except UserError as e:
            self.startup_error = str(e)
        except Exception as e:  # noqa: BLE001 - reported by ping; the traceback goes to the worker's log
            import traceback

            traceback.print_exc()
            self.startup_error = f"worker {worker_id} could not load the models: {type(e).__name__}: {_first_line(e)}"

    def _start(self, config: dict, device: str, fitness_fn) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..fitness.evaluator import evaluators_for

        import logging

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        # Thread count: Ray sets OMP_NUM_THREADS to each actor's CPUs; more threads than that
        # spin against the other workers and slowed small models' forwards a hundredfold here.
        self.cfg = SearchConfig.model_validate(config)
        self.device = device
        compute_dtype = self.cfg.workers.compute_dtype
        self.sources = resident_sources(self.cfg.model_refs(), device, compute_dtype)
        if self.cfg.ps is not None and get_kernel(self.cfg.ps.method).stats:
            # statistics (Fisher, Grams) held resident beside the sources: read from the cache
            # the driver filled before the workers started (run/search.py, check_plan)
            self.sources.update(stats_sources(self.cfg.ps.method, self.cfg.models, self.sources, self.cfg.calibration,
                                              device, self.cfg.model_calibration))
        home = self.cfg.base_model or self.cfg.models[0]
        # a tokenizer: section: the candidates' vocabulary, every source's rows re-indexed to it
        # once (the plan keeps them) and the tokenizer built as export builds it
        self.vocab = vocab.build_for(self.cfg.tokenizer.source, self.cfg.tokenizer, self.cfg.model_refs(),
                                     self.cfg.base_model, self.sources) if self.cfg.tokenizer is not None else None
        if self.vocab is not None:
            self.vocab.cache = {}
        self.tokenizer = self.vocab.tokenizer if self.vocab is not None else AutoTokenizer.from_pretrained(home)
        self.compute_dtype = self.sources[home].compute_dtype
        # the candidate: a private copy of the base, overwritten in place by every PS candidate
        self.candidate = AutoModelForCausalLM.from_pretrained(home, dtype=self.compute_dtype).to(device).eval()
        if self.vocab is not None:
            self.candidate.resize_token_embeddings(self.vocab.size, mean_resizing=False)
        self.candidate.config.use_cache = False
        self.candidate_tensors = self.candidate.state_dict()
        arch = self.sources[home].arch
        self.routed = RoutedBuilder(arch.layer_prefix, arch.layer_count_key, device, self.compute_dtype)
        self.evaluators = evaluators_for(self.cfg, device, function=fitness_fn)
        # measured last, with the sources and the candidate in memory; a GPU worker has its
        # device to itself, CPU workers share the machine
        sharing = 1 if device.startswith("cuda") else self.cfg.workers.count
        self.magnitudes = SortedMagnitudes.for_worker(device, sharing)

    def ping(self) -> str | None:
        """None once the worker is ready, else why it could not start."""
        return self.startup_error

    def materialize(self, recipe: Recipe) -> torch.nn.Module:
        """The candidate as a live model: PS written in place, DFS as the folded model over resident blocks."""
        p = plan(recipe, self.sources, vocab=self.vocab)
        for out in p.ps_outputs.values():
            dst = self.candidate_tensors.get(out.name)
            if dst is None or tuple(dst.shape) != out.shape:
                raise UserError(f"the search's candidate has no tensor {out.name} of shape {list(out.shape)}; PS search spaces keep the base's layout")
            out = dataclasses.replace(out, expr=self.magnitudes.attach(out.expr, self._load))
            dst.copy_(compute(out, self._get, self.device))
        if recipe.routing is None:
            return self.candidate
        models = {ref: src.model for ref, src in self.sources.items()}
        models[MERGE_SOURCE] = self.candidate
        home = self.sources[self.cfg.base_model or self.cfg.models[0]]
        return self.routed.build(recipe, p, models, self._stored_dtype, self._get, home.arch)

    def _get(self, read) -> torch.Tensor:
        if read.source == MERGE_SOURCE:
            return self.candidate_tensors[read.name]
        return self.sources[read.source].get(read.name)

    def _load(self, read) -> torch.Tensor:
        return load(read, self._get, self.device)

    def _stored_dtype(self, read) -> torch.dtype:
        return self.sources[read.source].dtype(read.name)

    @torch.no_grad()
    def evaluate(self, recipe_data: dict, split: str = "search", race: dict | None = None) -> dict:
        """Score a candidate. ``race`` ({"threshold", "margin"}, search split only): score the
        racing subset first and stop there when its fitness + margin < threshold."""
        if self.startup_error is not None:  # a replacement actor that could not start
            raise RuntimeError(self.startup_error)
        t0 = time.perf_counter()
        recipe = parse_recipe(recipe_data, where="candidate")
        model = self.materialize(recipe)
        self._sync()
        t1 = time.perf_counter()
        extra = {}
        with ForwardTimer(model, self._sync) as timer:
            if race is None:
                result = self.evaluators[split].score_model(model, self.tokenizer)
                extra["docs"] = self.evaluators[split].documents
            else:
                result, extra = self._race(model, race)
        if BENCH_DELAY in os.environ:
            time.sleep(bench_delay(os.environ[BENCH_DELAY], recipe.hash()))
        t2 = time.perf_counter()
        return {"scores": result.scores, "fitness": result.fitness, "merge_s": t1 - t0, "eval_s": t2 - t1,
                "forward_s": timer.seconds, "wall_s": t2 - t0, "worker": self.worker_id, **extra}

    def _race(self, model, race: dict):
        head, rest = self.evaluators["search_first"], self.evaluators["search_rest"]
        first = head.score_model(model, self.tokenizer)
        if first.fitness + race["margin"] < race["threshold"]:
            return first, {"stage": "first", "first_fitness": first.fitness, "docs": head.documents}
        more = rest.score_model(model, self.tokenizer)
        counts = lambda ev: {t: len(v) for t, v in ev.samples.items()}  # noqa: E731
        scores = combine_stages(first.scores, more.scores, counts(head), counts(rest))
        full = Result(scores=scores, fitness=combine(head.terms, scores))
        return full, {"stage": "full", "first_fitness": first.fitness, "docs": head.documents + rest.documents}

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class ForwardTimer:
    """Seconds spent inside the model's forward passes (what is not lm-eval's own overhead)."""

    def __init__(self, model: torch.nn.Module, sync):
        self.model, self.sync, self.seconds, self._t = model, sync, 0.0, 0.0

    def _pre(self, *_):
        self.sync()
        self._t = time.perf_counter()

    def _post(self, *_):
        self.sync()
        self.seconds += time.perf_counter() - self._t

    def __enter__(self) -> "ForwardTimer":
        # hooks are removed on exit: a DFS view shares its shell's hook registry
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *_) -> None:
        for h in self._handles:
            h.remove()


# bench/bench_search.py utilization: "MEAN_S,CV" adds a lognormal delay to every evaluation,
# drawn from the recipe's hash (the same candidate waits as long on any worker and run), so
# evaluation times vary as they do on real models; never set outside that bench
BENCH_DELAY = "EVOMERGE_BENCH_DELAY"


def bench_delay(spec: str, recipe_hash: str) -> float:
    mean, cv = (float(v) for v in spec.split(","))
    sigma = float(np.sqrt(np.log1p(cv * cv)))
    rng = np.random.default_rng(int(recipe_hash, 16))
    return float(mean * np.exp(sigma * rng.standard_normal() - sigma * sigma / 2))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def resident_sources(refs: list[str], device: str, compute_dtype: str | None) -> dict:
    """Every reference's resident source; a model is loaded once however many references
    name it (itself, or as the model of LoRA sources MODEL+ADAPTER)."""
    from ..io.lora import split_ref

    models: dict[str, ResidentModel] = {}
    out = {}
    for ref in refs:
        model, adapter = split_ref(ref)
        if model not in models:
            models[model] = ResidentModel(model, device, compute_dtype)
        out[ref] = models[model] if adapter is None else ResidentLora(models[model], adapter)
    return out
