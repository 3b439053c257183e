"""Progress reads well where it goes: plain whole lines when stderr is not a terminal."""

from __future__ import annotations

import subprocess
import sys

from conftest import write_yaml


def test_a_merge_into_a_log_shows_lines_not_a_redrawn_bar(family, tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"merge_method": "linear", "models": [
        {"model": str(family["llama"]["a"]), "parameters": {"weight": 1.0}},
        {"model": str(family["llama"]["b"]), "parameters": {"weight": 1.0}}]})
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), str(tmp_path / "out")],
                          capture_output=True, text=True)  # stderr is a pipe, as in a log or CI
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("merge:")]
    assert "\r" not in done.stderr and lines and "100%" in lines[-1]


def test_lines_are_rate_limited_and_the_last_state_is_shown_once(capsys, monkeypatch):
    from evomerge import progress

    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 3600.0)
    bar = progress.progress_bar(total=50, desc="work", unit="step")
    for i in range(50):
        bar.update(1)
        bar.set_postfix(i=i)  # asks for a redraw every time
    bar.write("note")
    bar.close()
    got = capsys.readouterr()
    err = got.err.splitlines()
    assert len(err) == 2 and err[0].startswith("work:   0%") and "50/50" in err[1] and "i=49" in err[1]
    assert got.out == "note\n"  # tqdm.write's stream, untouched
