"""`evomerge export`: the best recipe of a run, as evomerge or mergekit YAML, optionally merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from ..errors import UserError
from ..io.writer import atomic_write_text
from ..recipe import Recipe
from .rundir import RunDir


def best_entry(rd: RunDir) -> dict:
    entries = [e for e in rd.read_history() if e.get("fitness") is not None and e.get("error") is None]
    if not entries:
        raise UserError(f"{rd.path} has no scored candidate yet; let the search run (or resume it) first")
    # the first of equals: the earliest candidate that reached the best fitness
    return max(entries, key=lambda e: (e["fitness"], -e["eval_id"]))


def best_recipe(rd: RunDir) -> tuple[Recipe, dict]:
    from .search import build_space

    entry = best_entry(rd)
    space = build_space(rd.load_config())
    return space.decode(np.array(entry["genome"])), entry


def to_mergekit(recipe: Recipe) -> str:
    if recipe.routing is not None:
        raise UserError("this recipe routes layers (DFS), which mergekit cannot express; export with --format evomerge")
    data = recipe.to_dict()
    data.pop("seed", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def export(run_dir: str, out: str | None = None, fmt: str = "evomerge", model_dir: str | None = None,
           device: str = "cpu", force: bool = False) -> str:
    rd = RunDir(run_dir)
    if fmt not in ("evomerge", "mergekit"):
        raise UserError(f"unknown format {fmt!r}; use evomerge or mergekit")
    recipe, entry = best_recipe(rd)
    text = recipe.to_yaml() if fmt == "evomerge" else to_mergekit(recipe)
    header = f"# best of {rd.path}: eval {entry['eval_id']}, fitness {entry['fitness']:.6f}\n"
    if out:
        atomic_write_text(Path(out), header + text)
    if model_dir:
        from ..merge.to_disk import merge_to_disk

        merge_to_disk(recipe, model_dir, device=device, force=force)
    return header + text
