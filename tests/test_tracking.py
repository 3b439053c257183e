"""TensorBoard tracking (run/tracking.py): real searches on the tiny zoo, their event files
read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evomerge.cli import main

from conftest import search_config


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def events(run: Path):
    """Every event file under RUN_DIR/tensorboard/, loaded whole (0: keep every point)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def approx(values: dict[int, float]):
    return pytest.approx(values, rel=1e-6)  # event files hold float32


def points(acc, tag: str) -> dict[int, float]:
    steps = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert len(steps) == len({s for s, _ in steps}), f"{tag}: a step logged twice"
    return dict(steps)


def test_search_and_resume_log_each_candidate_and_generation_once(tiny_zoo, tmp_path):
    """A tracked run stopped after two generations and resumed to three: one point per
    candidate (its history fitness, by eval id), per task score, per generation."""
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 12, "seed": 0})
    run = tmp_path / "run"
    assert main(["search", str(cfg), "--run-dir", str(run), "--max-evals", "8", "--tensorboard", "--quiet"]) == 0
    assert main(["resume", str(run), "--max-evals", "12", "--tensorboard", "--quiet"]) == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per session

    h, acc = history(run), events(run)
    assert len(h) == 12
    assert points(acc, "candidate/fitness") == approx({e["eval_id"]: e["fitness"] for e in h})
    assert points(acc, "candidate/failed") == {e["eval_id"]: 0.0 for e in h}
    for task, metrics in h[0]["scores"].items():
        for metric in metrics:
            assert points(acc, f"score/{task}/{metric}") == approx({e["eval_id"]: e["scores"][task][metric] for e in h})
    assert set(points(acc, "time/wall_s")) == {e["eval_id"] for e in h}
    for tag in ("generation/best", "generation/mean", "generation/best_so_far"):
        assert set(points(acc, tag)) == {0, 1, 2}, tag
    best = max(e["fitness"] for e in h)
    assert points(acc, "generation/best_so_far")[2] == pytest.approx(best, rel=1e-6)
    assert points(acc, "final/best_fitness") == approx({8: max(e["fitness"] for e in h[:8]), 12: best})
    (text,) = [t for t in acc.Tags()["tensors"] if t.startswith("final/test_split")]
    assert "best found" in acc.Tensors(text)[-1].tensor_proto.string_val[0].decode()


def test_untracked_run_writes_no_event_files_and_a_tracked_resume_logs_only_its_own(tiny_zoo, tmp_path):
    """Off by default (the Python API too); turned on at a resume, it logs what that session records."""
    import evomerge

    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", test=[], optimizer={"popsize": 4, "max_evals": 4, "seed": 1})
    run = evomerge.search(cfg, run_dir=tmp_path / "run")
    assert not (run.path / "tensorboard").exists()
    evomerge.resume(run.path, max_evals=8, tensorboard=True)
    acc = events(run.path)
    assert points(acc, "candidate/fitness") == approx({e["eval_id"]: e["fitness"] for e in run.history()[4:]})
    assert set(points(acc, "generation/best")) == {1}
    assert not [t for t in acc.Tags()["tensors"] if t.startswith("final/")]  # no test tasks: no table


def test_missing_tensorboard_is_one_line_before_anything_runs(tiny_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml")
    assert main(["search", str(cfg), "--run-dir", str(tmp_path / "run"), "--tensorboard"]) == 2
    assert 'pip install "evomerge[tracking]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
