"""`evomerge runs`: every run under a folder, a line each: how far it got, its best, how it ended."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

from ..errors import UserError
from . import liveness
from .rundir import RunDir


def list_runs(root: str | Path = "runs") -> str:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; name the folder holding run directories (default runs/)")
    rows = []
    for path in sorted(p for p in root.rglob("config.yaml") if (p.parent / "history.jsonl").exists() or (p.parent / "search.log").exists()):
        rd = RunDir(path.parent)
        try:
            cfg = rd.load_config()
        except UserError:
            continue  # a config.yaml that is not a run's (a model dir, say)
        history = rd.read_history(repair=False)  # a live search may be writing the last line
        scored = [e for e in history if e.get("fitness") is not None]
        best = max(scored, key=lambda e: e["fitness"]) if scored else None
        state = liveness.state(rd.path)
        rows.append((str(rd.path), cfg.optimizer.backend, f"{len(history)}/{cfg.optimizer.max_evals}",
                     f"{best['fitness']:.4f} (eval {best['eval_id']})" if best else "-", state,
                     _last_change(rd.path, state == "running")))
    if not rows:
        return f"no runs under {root}"
    head = ("run", "optimizer", "evals", "best fitness", "state", "last change")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _last_change(path: Path, running: bool) -> str:
    """When the run's own files last changed and, while it runs, how long ago its driver was heard from."""
    text = dt.datetime.fromtimestamp(max(_mtimes(path))).strftime("%Y-%m-%d %H:%M")
    age = liveness.heartbeat_age(path) if running else None
    return text if age is None else f"{text} (heartbeat {max(age, 0):.0f} s ago)"


def _mtimes(path: Path):
    # not the heartbeat or the lock (they tick while nothing else changes), nor hidden temp
    # files, which a live search renames away between listing and stat
    for f in path.iterdir():
        if f.name.startswith(".") or f.name in (liveness.HEARTBEAT, liveness.LOCK):
            continue
        with contextlib.suppress(FileNotFoundError):
            if f.is_file():
                yield f.stat().st_mtime
