"""The README's toy-zoo table is what the commands it names print, on this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from readme_results import compare, readme_block, score_rows  # noqa: E402


def test_compare_finds_a_changed_cell_and_a_changed_row():
    block = readme_block((REPO / "README.md").read_text())
    assert compare(block, block) is None
    first = next(line for line in block.splitlines() if line.startswith("| base |"))
    cells = first.split("|")
    cells[4] = f" {float(cells[4]) + 0.03:.3f} "
    assert "base / srt" in compare(block, block.replace(first, "|".join(cells)))
    assert "rows differ" in compare(block, block.replace("| base |", "| based |"))


def test_zoo_seeds_row_0_is_the_results_table():
    """The zoo-seeds table's seed 0 (the default zoo) says what the checked results table says."""
    from zoo_seeds import summary

    readme = (REPO / "README.md").read_text()
    skills = ["mir", "sft", "srt"]
    # the results table's sources and hand merges, as bench/zoo_seeds.py scores them; its searches apart
    table = {label.strip("`"): cells for label, cells in score_rows(readme_block(readme)).items()}
    search = table.pop("evomerge search search_spaces/toy_ps.yaml")[-1]
    rows = {name: dict(zip(skills, cells)) for name, cells in table.items() if not name.startswith("evomerge ")}
    s = summary({"skills": skills, "rows": rows})
    want = [s["own_min"], s["other_max"], s["source_mean_max"], s["uniform"], s["best_hand"], search]
    seed0 = next(line for line in readme_block(readme, "zoo-seeds").splitlines() if line.startswith("| 0 |"))
    cells = [c.strip() for c in seed0.strip("|").split("|")]
    got = [float(c.split()[0]) for c in cells[1:6]] + [float(cells[7])]
    assert got == pytest.approx(want, abs=5e-4) and cells[5].endswith(f"({s['best_hand_name']})"), (got, want)


def test_hand_grid_points_every_recipe_at_any_zoo_path():
    """Model paths are replaced in the parsed recipes: a zoo path with YAML's own characters stays one path."""
    from zoo_seeds import HAND, hand_grid

    zoo = Path("/tmp/rates0.029,0.015: [x]/seed1")
    grid = hand_grid(zoo)
    assert sorted(grid) == sorted(p.stem for p in HAND.glob("*.yaml")) and grid
    for recipe in grid.values():
        paths = [m["model"] for m in recipe["models"]] + ([recipe["base_model"]] if "base_model" in recipe else [])
        assert all(Path(p).parent == zoo for p in paths), paths


@pytest.mark.slow
def test_readme_results_reproduce():
    """Builds the default zoo (cached beside SmolLM2 across runs), scores the sources and hand
    merges and runs the shipped toy searches: ~10 min on 2 cores the first time."""
    from evomerge.zoo.smollm2 import cache_root

    zoo = cache_root() / "zoo-default"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "readme_results.py"), "--zoo", str(zoo),
                           "--check", str(REPO / "README.md")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stderr.strip().splitlines() or ["no output"])[-1] + "\n" + done.stdout[-3000:]


@pytest.mark.slow
def test_methods_table_reproduces():
    """docs/methods.md's table is what `python bench/methods_table.py` prints on the default zoo."""
    from evomerge.zoo.smollm2 import cache_root

    zoo = cache_root() / "zoo-default"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "methods_table.py"), "--zoo", str(zoo),
                           "--check", str(REPO / "docs" / "methods.md")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stderr.strip().splitlines() or ["no output"])[-1] + "\n" + done.stdout[-3000:]


def test_methods_table_lists_every_method():
    """Every per-tensor method of the registry has a row in docs/methods.md."""
    from evomerge.merge.kernels import KERNELS
    from methods_table import SKIP

    block = readme_block((REPO / "docs" / "methods.md").read_text(), "methods")
    rows = {line.split("|")[1].strip().strip("`") for line in block.splitlines()[2:]}
    assert rows == set(KERNELS) - set(SKIP) - {"passthrough"}
