"""The hand-merge grid on the zoo (issue: toy zoo): merge each docs/hand_merges/*.yaml and score the test splits.

    evomerge zoo build && python bench/hand_merges.py
Prints a markdown table: each recipe's exact match on mir_test, sft_test, srt_test and the mean.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from evomerge.fitness.evaluator import Evaluator  # noqa: E402
from evomerge.fitness.terms import FitnessTerm  # noqa: E402
from evomerge.merge.to_disk import merge_to_disk  # noqa: E402
from evomerge.recipe import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("mir_test", "sft_test", "srt_test")


def main() -> None:
    evaluator = Evaluator([FitnessTerm(t, "acc") for t in TASKS])
    out = Path(tempfile.mkdtemp(prefix="evomerge_hand_"))
    print("| recipe | " + " | ".join(TASKS) + " | mean |")
    print("|---|" + "---|" * (len(TASKS) + 1))
    for path in sorted((REPO / "docs" / "hand_merges").glob("*.yaml")):
        merge_to_disk(load_recipe(path), out / path.stem, recipe_dir=path.parent, progress=False)
        scores = evaluator.score_dir(out / path.stem).scores
        vals = [scores[t]["acc"] for t in TASKS]
        print(f"| {path.stem} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")


if __name__ == "__main__":
    main()
