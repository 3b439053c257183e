"""`evomerge report`: what a run did, as a table and a plot of fitness over evaluations."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .rundir import RunDir


def summarize(run_dir: str, plot: bool = True) -> str:
    rd = RunDir(run_dir)
    cfg = rd.load_config()
    history = rd.read_history()
    if not history:
        raise UserError(f"{rd.path} has no evaluated candidates yet")
    gens: dict[int, list[dict]] = {}
    for e in history:
        gens.setdefault(e["generation"], []).append(e)
    lines = [f"run {rd.path} — {cfg.optimizer.backend}, popsize {cfg.optimizer.popsize}, {len(history)} candidates",
             "| generation | scored | failed | cached | raced off | best | mean | best so far |", "|---|---|---|---|---|---|---|---|"]
    best_so_far = float("-inf")
    for g in sorted(gens):
        fits = [e["fitness"] for e in gens[g] if e.get("fitness") is not None]
        failed = sum(1 for e in gens[g] if e.get("error"))
        cached = sum(1 for e in gens[g] if e.get("cached"))
        stopped = sum(1 for e in gens[g] if e.get("stage") == "first")  # racing: first stage only
        full = [e["fitness"] for e in gens[g] if e.get("fitness") is not None and e.get("stage") != "first"]
        if full:
            best_so_far = max(best_so_far, max(full))
        row = (f"| {g} | {len(fits)} | {failed} | {cached} | {stopped} | {max(fits):.4f} | {sum(fits) / len(fits):.4f} | {best_so_far:.4f} |"
               if fits else f"| {g} | 0 | {failed} | {cached} | {stopped} | - | - | {best_so_far:.4f} |")
        lines.append(row)
    busy = sum(e.get("wall_s") or 0.0 for e in history)
    merge = sum(e.get("merge_s") or 0.0 for e in history)
    lines.append(f"\nworker time {busy:.1f} s ({merge:.1f} s materializing candidates)")
    if rd.results.is_file():
        lines.append("\n" + rd.results.read_text().strip())
    if plot:
        lines.append(f"plot: {plot_history(history, rd.path / 'fitness.png')}")
    return "\n".join(lines)


def plot_history(history: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["eval_id"] for e in history if e.get("fitness") is not None]
    ys = [e["fitness"] for e in history if e.get("fitness") is not None]
    best, running = [], float("-inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=10, alpha=0.5, label="candidate")
    ax.plot(xs, best, color="C1", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
