"""Worker pools behind one interface: submit candidates, take results as they finish.

``InProcessPool`` (``--workers 0``) runs in this process, no Ray. ``RayPool``
keeps one actor per GPU (or CPU slot), each holding its sources resident, and
hands the next candidate to whichever actor frees up first. A dead actor is
replaced and its candidate reported as failed so the caller can run it again.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..fitness.env import OFFLINE_ENV, QUIET_ENV


@dataclass
class Outcome:
    tag: Any
    result: dict | None  # None when it failed
    error: str | None = None
    worker_died: bool = False
    retry: bool = True  # False for the candidate's own user error (e.g. weights summing to 0): it would fail again


@dataclass
class _Usage:
    """Worker-reported busy time over the pool's wall time, from the first candidate submitted
    (the driver's start-up before it, building the space and the run dir, is not the search's
    scheduling; until a submission, from when every worker was ready)."""

    started: float = field(default_factory=time.perf_counter)
    busy_s: float = 0.0
    submitted: bool = False

    def start(self) -> None:
        if not self.submitted:
            self.started, self.submitted = time.perf_counter(), True

    def add(self, outcome: "Outcome") -> "Outcome":
        if outcome.result is not None:
            self.busy_s += outcome.result.get("wall_s", 0.0)
        return outcome

    def utilization(self, workers: int) -> float:
        wall = time.perf_counter() - self.started
        return self.busy_s / (wall * workers) if wall > 0 and workers else 0.0


class InProcessPool:
    size = 1

    def __init__(self, config: dict, device: str = "cpu", fitness_fn=None):
        from .candidate import CandidateWorker

        self.worker = CandidateWorker(config, device, worker_id=0, fitness_fn=fitness_fn)
        if self.worker.ping() is not None:
            raise UserError(self.worker.ping())
        self.queue: deque = deque()
        self.usage = _Usage()

    def submit(self, tag, recipe: dict, split: str = "search", race: dict | None = None) -> None:
        self.usage.start()
        self.queue.append((tag, recipe, split, race))

    @property
    def pending(self) -> int:
        return len(self.queue)

    def next_outcome(self) -> Outcome:
        tag, recipe, split, race = self.queue.popleft()
        try:
            return self.usage.add(Outcome(tag, self.worker.evaluate(recipe, split, race)))
        except UserError as e:  # this candidate's own fault: recorded against it, the search goes on
            return Outcome(tag, None, f"UserError: {e}", retry=False)
        except Exception as e:  # a candidate that breaks must not end the search
            return Outcome(tag, None, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        pass


def gpus_available(ray) -> float:
    return float(ray.cluster_resources().get("GPU", 0))


class RayPool:
    def __init__(self, config: dict, count: int, gpus_per_worker="auto", cpus_per_worker: float = 1, address: str | None = None,
                 fitness_fn=None):
        """``fitness_fn``: a fitness callable sent to every actor (cloudpickle: by value when
        defined in __main__ or inside a function, by reference when importable)."""
        import ray

        self.ray = ray
        self.started_ray = False
        env = {"env_vars": {**OFFLINE_ENV, **QUIET_ENV}}
        if not ray.is_initialized():
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level=logging.WARNING)
            else:
                # "local": a private cluster even when `ray start --head` runs on this machine, RAY_ADDRESS
                # is set, or a crashed cluster left its address file (Ray would join that one instead)
                ray.init(address="local", num_cpus=max(count * cpus_per_worker, 1), include_dashboard=False,
                         runtime_env=env, log_to_driver=False, logging_level=logging.WARNING)
                self.started_ray = True
        have_gpus = gpus_available(ray)
        gpus = (1.0 if have_gpus >= count else 0.0) if gpus_per_worker == "auto" else float(gpus_per_worker)
        if gpus > 0 and have_gpus < gpus * count:
            self.close()
            # Ray would queue the actors forever; say so instead of hanging
            raise UserError(f"asked for {count} workers x {gpus} GPU but the Ray cluster has {have_gpus:g} GPUs; "
                            "use fewer workers or workers.gpus_per_worker: 0")
        have_cpus = float(ray.cluster_resources().get("CPU", 0))
        if cpus_per_worker * count > have_cpus:
            self.close()
            raise UserError(f"asked for {count} workers x {cpus_per_worker} CPU but the Ray cluster has {have_cpus:g} CPUs; use fewer workers")
        from .candidate import CandidateWorker

        self.device = "cuda" if gpus > 0 else "cpu"
        self.config = config
        self.fitness_fn = fitness_fn
        self.actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=0)(CandidateWorker)
        self.size = count
        self.next_id = 0
        self.actors = [self._spawn() for _ in range(count)]
        try:
            errors = ray.get([a.ping.remote() for a in self.actors])  # sources loaded, tasks built
        except ray.exceptions.RayError as e:  # an actor that died starting (out of memory, a crash)
            self.close()
            raise UserError(f"a worker could not start: {str(e).strip().splitlines()[0]}") from None
        if any(errors):
            self.close()
            raise UserError(next(e for e in errors if e))
        self.idle = deque(self.actors)
        self.queue: deque = deque()
        self.inflight: dict = {}  # ObjectRef -> (tag, recipe, split, race, actor)
        self.usage = _Usage()

    def _spawn(self):
        actor = self.actor_cls.remote(self.config, self.device, self.next_id, self.fitness_fn)
        self.next_id += 1
        return actor

    def submit(self, tag, recipe: dict, split: str = "search", race: dict | None = None) -> None:
        self.usage.start()
        self.queue.append((tag, recipe, split, race))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            tag, recipe, split, race = self.queue.popleft()
            actor = self.idle.popleft()
            ref = actor.evaluate.remote(recipe, split, race)
            self.inflight[ref] = (tag, recipe, split, race, actor)

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.inflight)

    def next_outcome(self) -> Outcome:
        ray = self.ray
        ready, _ = ray.wait(list(self.inflight), num_returns=1)
        ref = ready[0]
        tag, recipe, split, race, actor = self.inflight.pop(ref)
        try:
            outcome = self.usage.add(Outcome(tag, ray.get(ref)))
            self.idle.append(actor)
        except ray.exceptions.RayActorError as e:
            # the actor is gone (killed, OOM, node lost): start a fresh one in its place
            self.actors.remove(actor)
            fresh = self._spawn()
            self.actors.append(fresh)
            self.idle.append(fresh)
            outcome = Outcome(tag, None, f"worker died: {str(e).splitlines()[0]}", worker_died=True)
        except ray.exceptions.RayTaskError as e:
            self.idle.append(actor)
            cause = e.cause if getattr(e, "cause", None) is not None else e
            text = str(cause).splitlines()[0] if str(cause) else ""
            outcome = Outcome(tag, None, f"{type(cause).__name__}: {text}", retry=not isinstance(cause, UserError))
        self._dispatch()
        return outcome

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a)
            except Exception:
                traceback.print_exc()
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()


def make_pool(config: dict, count: int, gpus_per_worker="auto", cpus_per_worker: float = 1, address: str | None = None,
              fitness_fn=None):
    if count == 0:
        return InProcessPool(config, "cuda" if gpus_per_worker not in ("auto", 0, 0.0) else "cpu", fitness_fn)
    return RayPool(config, count, gpus_per_worker, cpus_per_worker, address, fitness_fn)
