"""The README's Python API example, run as written on the tiny zoo (paths pointed at it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_api_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(tiny_zoo, tmp_path, monkeypatch, capsys):
    code = readme_api_block().replace("runs/zoo/", f"{tiny_zoo}/").replace("runs/api/", f"{tmp_path}/")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert (tmp_path / "ta" / "model.safetensors").is_file()
    history = [json.loads(line) for line in (tmp_path / "search" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 12 and "task_arithmetic" in out  # resumed with a budget of 12
    custom = [json.loads(line) for line in (tmp_path / "custom" / "history.jsonl").read_text().splitlines()]
    assert len(custom) == 8 and all(set(e["scores"]) == {"function"} for e in custom)


def test_api_results_agree_with_the_cli(tiny_zoo, tmp_path):
    import evomerge
    from conftest import run_cli

    recipe = {"merge_method": "linear", "models": [{"model": str(tiny_zoo / "mir"), "parameters": {"weight": 1.0}},
                                                   {"model": str(tiny_zoo / "sft"), "parameters": {"weight": 1.0}}]}
    evomerge.merge(recipe, tmp_path / "api")
    got = evomerge.evaluate(tmp_path / "api", "mir_search:logprob", limit=8)
    cli = run_cli("eval", tmp_path / "api", "--tasks", "mir_search:logprob", "--limit", "8", "--json")
    assert cli.returncode == 0
    assert json.loads(cli.stdout.strip().splitlines()[-1])["fitness"] == got.fitness
    with pytest.raises(evomerge.UserError, match="merge_method"):
        evomerge.merge({"models": []}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
