"""A non-editable install (`pip install .`) carries the shipped tasks and finds them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Loads a zoo task and an English one from the installed package, as `evomerge eval` would.
PROBE = """
import json, evomerge
from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.terms import parse_terms
ev = Evaluator(parse_terms("mir_test,en_facts"))
docs = {name: len(list(task.eval_docs)) for name, task in ev._task_dict["tasks"].items()}
print(json.dumps({"package": evomerge.__file__, "task_path": str(ev.task_path), "docs": docs}))
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tasks_ship_with_a_non_editable_install(tmp_path):
    # Build from a copy of the sources: building in the checkout would leave build/ there.
    src = tmp_path / "src"
    shutil.copytree(REPO / "evomerge", src / "evomerge", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist")])
    (wheel,) = (tmp_path / "dist").glob("evomerge-*.whl")
    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)])

    # PYTHONPATH comes before the editable install's finder, so `evomerge` is the installed copy;
    # the run's directory is outside the checkout, so nothing falls back to the repo's files.
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = json.loads(run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(site)
    assert Path(out["task_path"]) == site / "evomerge" / "tasks"
    assert out["docs"] == {"mir_test": 200, "en_facts": 48}
