"""`evomerge runs`: every run under a folder, a line each: how far it got, its best, how it ended."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from ..errors import UserError
from .rundir import RunDir


def status(rd: RunDir) -> str:
    """finished (its table is written), stopped early (patience or wall time), or interrupted
    (no end yet: still running, or killed; `evomerge resume` continues it)."""
    log = rd.log_file.read_text(encoding="utf-8") if rd.log_file.is_file() else ""
    if "stopped after generation" in log:
        return "stopped early"
    if rd.results.is_file() or "best fitness" in log:
        return "finished"
    return "interrupted or running"


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
        history = rd.read_history()
        scored = [e for e in history if e.get("fitness") is not None]
        best = max(scored, key=lambda e: e["fitness"]) if scored else None
        changed = max(f.stat().st_mtime for f in rd.path.iterdir() if f.is_file())
        rows.append((str(rd.path), cfg.optimizer.backend, f"{len(history)}/{cfg.optimizer.max_evals}",
                     f"{best['fitness']:.4f} (eval {best['eval_id']})" if best else "-", status(rd),
                     dt.datetime.fromtimestamp(changed).strftime("%Y-%m-%d %H:%M")))
    if not rows:
        return f"no runs under {root}"
    head = ("run", "optimizer", "evals", "best fitness", "state", "last change")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
