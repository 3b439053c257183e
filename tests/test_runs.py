"""`evomerge runs` tells running, finished and crashed apart: a real search process, its lock
and heartbeat (run/liveness.py), killed with SIGKILL and resumed; and hand-made run dirs."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.errors import UserError
from evomerge.run import liveness
from evomerge.run.rundir import RunDir

from conftest import run_cli, search_config


def _row(root: Path, run: Path) -> dict:
    """The run's line of `evomerge runs ROOT`, by column name."""
    ran = run_cli("runs", root)
    assert ran.returncode == 0, ran.stderr
    head, _, *rows = ran.stdout.splitlines()
    names = [c.strip() for c in head.strip("|").split("|")]
    for line in rows:
        cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
        if cells["run"] == str(run):
            return cells
    raise AssertionError(f"{run} not listed:\n{ran.stdout}")


def _wait_for_history(proc: subprocess.Popen, run: Path, lines: int, timeout: float = 180) -> None:
    hist, deadline = run / "history.jsonl", time.time() + timeout
    while not (hist.is_file() and hist.read_text().count("\n") >= lines):
        if proc.poll() is not None:
            raise AssertionError(f"the search ended early: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, f"no {lines} history lines in {timeout} s"
        time.sleep(0.05)


def _budget_to_finish(run: Path, popsize: int) -> int:
    """A --max-evals that ends the killed run at the generation it was in (never below what is done or told)."""
    rd = RunDir(run)
    told = (rd.load_checkpoint() or {}).get("generation", 0) * popsize
    return max(told, popsize * math.ceil(len(rd.read_history()) / popsize), popsize)


def test_running_refuses_a_second_resume_crashed_after_kill_finished_after_resume(tiny_zoo, tmp_path):
    cfg = search_config(tiny_zoo, tmp_path / "c.yaml", optimizer={"popsize": 4, "max_evals": 100_000, "seed": 0})  # runs till killed: on an idle machine 400 evals of the tiny zoo take seconds
    root = tmp_path / "runs"
    run = root / "r"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(run), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_history(proc, run, 1)
        row = _row(root, run)
        assert row["state"] == "running" and "heartbeat" in row["last change"], row

        second = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(run), "--quiet"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"evomerge: error: {run} is running (pid {proc.pid} on {socket.gethostname()}); wait for it or kill it"]
        assert "resumed" not in (run / "search.log").read_text()  # refused before it wrote a thing
        assert proc.poll() is None, "the search ended before the kill: the checks above did not see it alive"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    row = _row(root, run)
    assert row["state"] == "crashed" and "heartbeat" not in row["last change"], row

    assert run_cli("resume", run, "--max-evals", _budget_to_finish(run, 4), "--quiet").returncode == 0
    assert _row(root, run)["state"] == "finished"
    beat = json.loads((run / liveness.HEARTBEAT).read_text())
    assert beat["ended"] and beat["evals"] == len(RunDir(run).read_history())


def _hand_made(path: Path, log: str, beat_age: float | None = None, host: str = liveness.HOST, test: bool = False) -> Path:
    path.mkdir()
    (path / "config.yaml").write_text(f"name: hand\ntest: {'[{task: t}]' if test else '[]'}\n")
    (path / "search.log").write_text(log)
    if beat_age is not None:
        (path / liveness.HEARTBEAT).write_text(json.dumps(
            {"time": time.time() - beat_age, "pid": 1, "host": host, "evals": 3, "ended": False}))
    return path


SUMMARY = "2025-01-01 00:00:09 best fitness -1.0000 at eval 2; worker utilization 50.0%; best recipe: best.yaml\n"


def test_state_of_hand_made_run_dirs(tmp_path):
    started = "2025-01-01 00:00:00 search started\n"
    stale = _hand_made(tmp_path / "stale", started, beat_age=3 * liveness.STALE_S)
    assert liveness.state(stale) == "crashed"
    assert liveness.heartbeat_age(stale) == pytest.approx(3 * liveness.STALE_S, abs=5)
    # never locked (no run.lock: a filesystem without flock): a fresh heartbeat is all there is
    assert liveness.state(_hand_made(tmp_path / "fresh", started, beat_age=1)) == "running"
    assert liveness.state(_hand_made(tmp_path / "old", started)) == "crashed"  # from before heartbeats

    # a free lock outweighs a fresh heartbeat from this host, not one from another host
    local = _hand_made(tmp_path / "local", started, beat_age=1)
    (local / liveness.LOCK).write_text("{}")
    assert liveness.state(local) == "crashed"
    remote = _hand_made(tmp_path / "remote", started, beat_age=1, host=liveness.HOST + "-elsewhere")
    (remote / liveness.LOCK).write_text("{}")
    assert liveness.state(remote) == "running"

    assert liveness.state(_hand_made(tmp_path / "done", started + SUMMARY)) == "finished"
    stopped = started + "2025-01-01 00:00:08 stopped after generation 3: no improvement\n" + SUMMARY
    assert liveness.state(_hand_made(tmp_path / "stopped", stopped)) == "stopped early"
    # killed while scoring the test split, or in a later session: not finished
    assert liveness.state(_hand_made(tmp_path / "mid_test", started + SUMMARY, test=True)) == "crashed"
    table = "2025-01-01 00:00:10 test-split table written to results.md\n"
    assert liveness.state(_hand_made(tmp_path / "tested", started + SUMMARY + table, test=True)) == "finished"
    resumed = started + SUMMARY + "2025-01-02 00:00:00 max_evals 4 -> 8\n2025-01-02 00:00:00 resumed\n"
    assert liveness.state(_hand_made(tmp_path / "resumed", resumed)) == "crashed"


def test_hold_is_exclusive_and_its_heartbeat_counts_whole_lines(tmp_path):
    run = _hand_made(tmp_path / "run", "2025-01-01 00:00:00 search started\n")
    with liveness.hold(run):
        assert liveness.state(run) == "running"
        beat = json.loads((run / liveness.HEARTBEAT).read_text())
        assert beat["pid"] > 0 and beat["host"] == liveness.HOST and not beat["ended"]
        owner = json.loads((run / liveness.LOCK).read_text())
        assert owner["pid"] == beat["pid"] and owner["started"]
        with pytest.raises(UserError, match=rf"is running \(pid {beat['pid']} on .*\); wait for it or kill it"):
            with liveness.hold(run):  # another open file description: flock refuses it as it would another process
                pass
        (run / "history.jsonl").write_text('{"eval_id": 0}\n{"eval_id": 1}\n{"eval_id": 2, "fit')
    beat = json.loads((run / liveness.HEARTBEAT).read_text())
    assert beat["ended"] and beat["evals"] == 2
    assert liveness.state(run) == "crashed"  # the lock is free and the log has no end
