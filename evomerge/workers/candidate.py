"""One worker's job: turn a recipe into a live model and score it.

Built once per worker: the resident sources, one preallocated candidate model
(PS merges are written into its parameters in place), the tokenizer, and the
fitness evaluator with its lm-eval tasks. DFS paths run as views over the
resident blocks (see merge/routed_view.py), copying no weights.
"""

from __future__ import annotations

import time

import torch

from ..fitness.env import set_offline_env

set_offline_env()

from ..errors import UserError  # noqa: E402
from ..fitness.terms import FitnessTerm  # noqa: E402
from ..merge.materialize import compute, plan  # noqa: E402
from ..merge.routed_view import routed_view  # noqa: E402
from ..recipe import MERGE_SOURCE, Recipe, parse_recipe  # noqa: E402
from ..space.config import SearchConfig  # noqa: E402
from .resident import ResidentModel, blocks_of  # noqa: E402


class CandidateWorker:
    def __init__(self, config: dict, device: str = "cpu", worker_id: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..fitness.evaluator import Evaluator

        import logging

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        # Thread count: Ray sets OMP_NUM_THREADS to each actor's CPUs; more threads than that
        # spin against the other workers and slowed small models' forwards a hundredfold here.
        self.cfg = SearchConfig.model_validate(config)
        self.device = device
        self.worker_id = worker_id
        self.sources = {ref: ResidentModel(ref, device) for ref in self.cfg.model_refs()}
        home = self.cfg.base_model or self.cfg.models[0]
        self.tokenizer = AutoTokenizer.from_pretrained(home)
        # the candidate: a private copy of the base, overwritten in place by every PS candidate
        self.candidate = AutoModelForCausalLM.from_pretrained(home, dtype="auto").to(device).eval()
        self.candidate.config.use_cache = False
        self.candidate_tensors = self.candidate.state_dict()
        fit = self.cfg.fitness
        self.evaluators = {
            "search": Evaluator([FitnessTerm(t.task, t.metric, t.weight) for t in fit.tasks], fit.task_path, fit.limit, fit.batch_size, device),
        }
        if self.cfg.test:
            self.evaluators["test"] = Evaluator([FitnessTerm(t.task, t.metric, t.weight) for t in self.cfg.test], fit.task_path, None, fit.batch_size, device)

    def ping(self) -> int:
        return self.worker_id

    def materialize(self, recipe: Recipe) -> torch.nn.Module:
        """The candidate as a live model: PS written in place, DFS as a view over resident blocks."""
        if recipe.merge_method:
            ps = plan(recipe.model_copy(update={"routing": None}), self.sources)
            get = lambda read: self.sources[read.source].get(read.name)  # noqa: E731
            for out in ps.outputs:
                dst = self.candidate_tensors.get(out.name)
                if dst is None or tuple(dst.shape) != out.shape:
                    raise UserError(f"the search's candidate has no tensor {out.name} of shape {list(out.shape)}; PS search spaces keep the base's layout")
                dst.copy_(compute(out, get, self.device))
        if recipe.routing is None:
            return self.candidate
        return self._view(recipe)

    def _view(self, recipe: Recipe) -> torch.nn.Module:
        routing = recipe.routing
        emb = routing.embeddings or (MERGE_SOURCE if recipe.merge_method else recipe.base_model)
        home = self.sources[self.cfg.base_model or self.cfg.models[0]]
        prefix = home.arch.layer_prefix

        def model_of(src: str):
            return self.candidate if src == MERGE_SOURCE else self.sources[src].model

        layers, types = [], []
        for slot in routing.slots:
            block = blocks_of(model_of(slot.source), prefix)[slot.layer]
            layers.append((block, slot.scale))
            src_types = getattr(model_of(slot.source).config, "layer_types", None)
            if isinstance(src_types, list):
                types.append(src_types[slot.layer])
        return routed_view(model_of(emb), prefix, layers, home.arch.layer_count_key, types or None)

    @torch.no_grad()
    def evaluate(self, recipe_data: dict, split: str = "search") -> dict:
        t0 = time.perf_counter()
        recipe = parse_recipe(recipe_data, where="candidate")
        model = self.materialize(recipe)
        self._sync()
        t1 = time.perf_counter()
        with ForwardTimer(model, self._sync) as timer:
            result = self.evaluators[split].score_model(model, self.tokenizer)
        t2 = time.perf_counter()
        return {"scores": result.scores, "fitness": result.fitness, "merge_s": t1 - t0, "eval_s": t2 - t1,
                "forward_s": timer.seconds, "wall_s": t2 - t0, "worker": self.worker_id}

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
