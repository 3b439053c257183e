"""Stochastic weight averaging (Izmailov et al. 2018) over saved checkpoints.

SWA is the uniform average of iterates along one run; here it is a linear recipe over
the chosen checkpoints, so `evomerge merge` can reproduce it from the recipe written
beside the weights.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from ..errors import UserError
from ..recipe import Recipe, parse_recipe

_GLOB = re.compile(r"[*?\[]")


def natural_key(path: Path) -> list:
    """step200 before step1000: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def select_checkpoints(args: list[str], last: int | None = None, stride: int = 1) -> list[Path]:
    """Checkpoint dirs in training order: dirs as given, a glob's matches in natural order;
    then every ``stride``-th, then the ``last`` of those."""
    if stride < 1:
        raise UserError(f"--stride must be >= 1, got {stride}")
    if last is not None and last < 1:
        raise UserError(f"--last must be >= 1, got {last}")
    found: list[Path] = []
    for arg in args:
        if _GLOB.search(arg):
            hits = sorted((Path(h) for h in glob.glob(arg) if Path(h, "config.json").is_file()), key=natural_key)
            if not hits:
                raise UserError(f"no checkpoint directories match {arg!r} (a match needs a config.json)")
            found += hits
        else:
            if not Path(arg, "config.json").is_file():
                raise UserError(f"{arg} is not a model directory (no config.json)")
            found.append(Path(arg))
    if len(set(found)) != len(found):
        twice = next(p for p in found if found.count(p) > 1)
        raise UserError(f"checkpoint {twice} is listed twice; list each once")
    chosen = found[::stride]
    if last is not None:
        chosen = chosen[-last:]
    if len(chosen) < 2:
        raise UserError(f"SWA needs at least 2 checkpoints; {len(chosen)} selected from {len(found)}")
    return chosen


def uniform_recipe(models: list[Path | str], dtype: str | None = None) -> Recipe:
    """The equal-weight average: SWA over checkpoints, the uniform soup over fine-tunes."""
    data = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
    if dtype:
        data["out_dtype"] = dtype
    return parse_recipe(data)
