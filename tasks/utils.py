"""Loader and scoring for the zoo tasks.

lm-eval resolves a YAML's relative ``data_files`` against the working directory, so the
tasks load their jsonl through this ``custom_dataset`` instead: paths resolve against this
file, and the tasks work from any directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_split(data_file: str, **_metadata) -> dict[str, datasets.Dataset]:
    """The docs of one jsonl file as the ``test`` split (lm-eval passes task metadata too)."""
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(
            f"task data file {path} is missing; regenerate it with `python -m evomerge.zoo.data {path.parent}`"
        )
    with path.open(encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    (loglikelihood, is_greedy), = results
    return {"acc": int(is_greedy), "logprob": loglikelihood / len(doc["answer"])}
