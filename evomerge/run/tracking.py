"""Optional experiment tracking: a search's numbers as TensorBoard event files in RUN_DIR/tensorboard/.

Off by default (`evomerge search --tensorboard` turns it on). Event files are plain files
written offline, so a run needs no server; `tensorboard --logdir runs/` shows every run.

Candidates are logged at step = eval id and generations at step = generation, each once:
only what this process records is logged, so a resume opens a second event file in the
same folder that continues where the first stopped.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

FOLDER = "tensorboard"
TIMES = ("wall_s", "merge_s", "forward_s")


def summary_writer():
    """torch's SummaryWriter class; imported here only, so a run without tracking never loads tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install "evomerge[tracking]"') from None
    return SummaryWriter


class Tracker:
    """One event file for this process's part of a run, flushed as each point lands, so a
    killed search leaves on disk what its history has."""

    def __init__(self, run_dir: Path):
        self.writer = summary_writer()(log_dir=str(Path(run_dir) / FOLDER))

    def candidate(self, entry: dict) -> None:
        step, add = entry["eval_id"], self.writer.add_scalar
        add("candidate/failed", float(entry.get("error") is not None), step)
        if entry.get("fitness") is not None:
            add("candidate/fitness", entry["fitness"], step)
        for task, metrics in (entry.get("scores") or {}).items():
            for metric, value in metrics.items():
                add(f"score/{task}/{metric}", value, step)
        for key in TIMES:
            if entry.get(key) is not None:
                add(f"time/{key}", entry[key], step)
        self.writer.flush()

    def generation(self, gen: int, entries: list[dict], best: dict | None) -> None:
        """Best and mean over the generation's scored candidates (raced-off ones too, as the
        report counts them), and the best full score so far."""
        fits = [e["fitness"] for e in entries if e.get("fitness") is not None]
        if fits:
            self.writer.add_scalar("generation/best", max(fits), gen)
            self.writer.add_scalar("generation/mean", sum(fits) / len(fits), gen)
        if best is not None:
            self.writer.add_scalar("generation/best_so_far", best["fitness"], gen)
        self.writer.flush()

    def finish(self, best: dict, evals: int, table: str | None) -> None:
        """The run's outcome at step = evaluations done (a resume with a larger budget adds a point)."""
        self.writer.add_scalar("final/best_fitness", best["fitness"], evals)
        if table is not None:
            self.writer.add_text("final/test_split", table, evals)  # a Markdown table, rendered as one
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
