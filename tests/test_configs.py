"""Every shipped search config loads, opens with the command that runs it, and decodes on the tiny zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.run.search import build_space
from evomerge.space.config import load_search_config, parse_search_config

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# evomerge ") and path.name in first
    cfg = load_search_config(path)
    assert cfg.fitness.tasks and cfg.optimizer.popsize >= 2


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name.startswith("toy_")], ids=lambda p: p.name)
def test_toy_config_decodes_on_the_zoo_layout(path, tiny_zoo):
    data = yaml.safe_load(path.read_text())
    swap = lambda ref: ref if ref == "merge" else str(tiny_zoo / Path(ref).name)  # noqa: E731
    data["base_model"] = swap(data["base_model"])
    data["models"] = [swap(m) for m in data["models"]]
    if data.get("dfs", {}).get("sources"):
        data["dfs"]["sources"] = [swap(s) for s in data["dfs"]["sources"]]
    space = build_space(parse_search_config(data, path.parent))
    recipe = space.decode(np.random.default_rng(0).random(space.dim))
    assert recipe.model_refs()


HAND = sorted((Path(__file__).resolve().parents[1] / "docs" / "hand_merges").glob("*.yaml"))


@pytest.mark.parametrize("path", HAND, ids=lambda p: p.name)
def test_hand_merge_recipes_load(path):
    from evomerge.recipe import load_recipe

    assert path.read_text().startswith(f"# evomerge merge docs/hand_merges/{path.name} ")
    recipe = load_recipe(path)
    assert len(recipe.models) == 3
