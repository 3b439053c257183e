"""Test-split exact match of the zoo: the base, each specialist, and their uniform average.

    python bench/zoo_scores.py [ZOO_DIR]      # default runs/zoo; builds the default zoo if missing

The acceptance bar (issue 3): each specialist >= 0.90 on its own skill; the base and each
specialist <= 0.50 on some other skill; no single source averages above 0.60; the uniform
average of the specialists stays below 0.50 (so merging takes more than averaging).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness.evaluator import Evaluator
from evomerge.fitness.terms import FitnessTerm
from evomerge.zoo.build import DEFAULT_DIR, build_zoo, read_manifest


def uniform_average(dirs: list[Path]) -> dict[str, torch.Tensor]:
    states = [AutoModelForCausalLM.from_pretrained(d, dtype="auto").state_dict() for d in dirs]
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


def main(zoo_dir: Path) -> None:
    build_zoo(zoo_dir)
    skills = [name for name in read_manifest(zoo_dir)["models"] if name != "base"]
    evaluator = Evaluator([FitnessTerm(f"{s}_test", "acc") for s in skills])

    # One model object, weights rewritten in place for each row: the search's own path.
    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "base", dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    rows = {}
    for name in ["base", *skills]:
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(zoo_dir / name, dtype="auto").state_dict())
        rows[name] = evaluator.score_model(model, tokenizer)
    model.load_state_dict(uniform_average([zoo_dir / s for s in skills]))
    rows["uniform avg"] = evaluator.score_model(model, tokenizer)

    header = f"{'model':<12}" + "".join(f"{s:>8}" for s in skills) + f"{'mean':>8}"
    print(header)
    for name, result in rows.items():
        cells = "".join(f"{result.scores[f'{s}_test']['acc']:>8.2f}" for s in skills)
        print(f"{name:<12}{cells}{result.fitness:>8.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
