"""`evomerge export`: the best recipe of a run, as evomerge or mergekit YAML, optionally merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from ..errors import UserError
from ..io.writer import atomic_write_text
from ..recipe import Recipe
from .confirm import confirmed_best
from .racing import scored_in_full
from .rundir import RunDir


def best_of(history: list[dict], confirmed: list[dict] | None = None) -> dict | None:
    """The best fully scored entry (a raced candidate stopped after its first stage has a
    fitness on fewer documents: never the best); of equals, the earliest by eval id. With
    ``confirmed`` (fitness.confirm's finalists, run/confirm.py), the best of them on every document."""
    if confirmed:
        best = confirmed_best(history, confirmed)
        if best is not None:
            return best
    return max(filter(scored_in_full, history), key=lambda e: (e["fitness"], -e["eval_id"]), default=None)


def best_entry(rd: RunDir) -> dict:
    best = best_of(rd.read_history(), rd.read_confirmed())
    if best is None:
        raise UserError(f"{rd.path} has no scored candidate yet; let the search run (or resume it) first")
    return best


def best_recipe(rd: RunDir, pick: int | None = None, weights: list[float] | None = None) -> tuple[Recipe, dict]:
    """The best entry's recipe, or a Pareto-front member's (by eval id, or by objective weights)."""
    from .front import pick as pick_entry
    from .search import build_space

    cfg = rd.load_config()
    if pick is None and weights is None:
        entry = best_entry(rd)
    else:
        entry = pick_entry(rd.read_history(), cfg, pick, weights)
    space = build_space(cfg)
    return space.decode(np.array(entry["genome"])), entry


def to_mergekit(recipe: Recipe) -> str:
    if recipe.routing is not None:
        raise UserError("this recipe routes layers (DFS), which mergekit cannot express; export with --format evomerge")
    data = recipe.to_dict()
    data.pop("seed", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def export(run_dir: str, out: str | None = None, fmt: str = "evomerge", model_dir: str | None = None,
           device: str = "cpu", force: bool = False, pick: int | None = None, weights: list[float] | None = None) -> str:
    rd = RunDir(run_dir)
    if fmt not in ("evomerge", "mergekit"):
        raise UserError(f"unknown format {fmt!r}; use evomerge or mergekit")
    if pick is not None and weights is not None:
        raise UserError("give --pick or --weights, not both")
    recipe, entry = best_recipe(rd, pick, weights)
    text = recipe.to_yaml() if fmt == "evomerge" else to_mergekit(recipe)
    which = "best" if pick is None and weights is None else "chosen"
    header = f"# {which} of {rd.path}: eval {entry['eval_id']}, fitness {entry['fitness']:.6f}\n"
    if out:
        atomic_write_text(Path(out), header + text)
    if model_dir:
        from ..merge.to_disk import merge_to_disk

        merge_to_disk(recipe, model_dir, device=device, force=force)
    return header + text
