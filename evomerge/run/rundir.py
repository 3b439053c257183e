"""The run directory: everything a search needs to survive a crash.

    config.yaml      frozen, resolved search config (a resume refuses a changed one)
    history.jsonl    one JSON object per candidate, appended and fsynced as it lands
    checkpoint.pkl   optimizer state after the last completed generation (atomic)
    best.yaml        the best recipe so far (atomic, always loadable)
    search.log       human-readable progress
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

from ..errors import UserError
from ..io.writer import atomic_write_text
from ..space.config import SearchConfig, config_to_yaml, parse_search_config

CHECKPOINT_VERSION = 1


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.history = self.path / "history.jsonl"
        self.checkpoint = self.path / "checkpoint.pkl"
        self.best = self.path / "best.yaml"
        self.log_file = self.path / "search.log"
        self.results = self.path / "results.md"
        self.front = self.path / "front.json"  # multi-objective runs: the Pareto front
        self.subsets = self.path / "subsets.json"  # the documents the fitness scores, per task
        self.confirmed = self.path / "confirmed.json"  # fitness.confirm: the finalists on every document

    def exists(self) -> bool:
        return self.config.is_file()

    def create(self, cfg: SearchConfig) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"run directory {self.path} already exists; resume it with `evomerge resume {self.path}` or choose another --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(cfg)

    def write_config(self, cfg: SearchConfig) -> None:
        atomic_write_text(self.config, config_to_yaml(cfg))

    def load_config(self) -> SearchConfig:
        import yaml

        if not self.exists():
            raise UserError(f"{self.path} is not a run directory (no config.yaml); start one with `evomerge search CONFIG`")
        return parse_search_config(yaml.safe_load(self.config.read_text()), self.path, where=str(self.config))

    # -- history -------------------------------------------------------------------
    def append(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n"
        with open(self.history, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_history(self, repair: bool = True) -> list[dict]:
        """Entries in order. A torn last line (a kill mid-write) is dropped and, with ``repair``
        (the search itself, before it appends), cut off the file: a reader beside a live search
        must not cut the line being written. A bad line before it is no crash's doing, so it
        is reported, never silently cut."""
        if not self.history.is_file():
            return []
        raw = self.history.read_bytes()
        lines = raw.splitlines(keepends=True)
        entries, good = [], 0
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                if number < len(lines):
                    raise UserError(f"{self.history}: line {number} is not a JSON object ({line[:60]!r}); "
                                    "restore the file or delete that line, then resume")
                break
            entries.append(entry)
            good += len(line)
        if repair and good != len(raw):
            with open(self.history, "r+b") as f:
                f.truncate(good)
        return entries

    def read_confirmed(self) -> list[dict] | None:
        """fitness.confirm's finalists with their whole-split scores, once the search has scored them."""
        if not self.confirmed.is_file():
            return None
        return json.loads(self.confirmed.read_text())["finalists"]

    # -- checkpoint ----------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump({"version": CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> dict | None:
        # our own file, written by save_checkpoint (never model weights)
        if not self.checkpoint.is_file():
            return None
        with open(self.checkpoint, "rb") as f:
            state = pickle.load(f)
        if state.get("version") != CHECKPOINT_VERSION:
            raise UserError(f"{self.checkpoint} was written by another evomerge version; start a new run")
        return state

    def log(self, message: str) -> None:
        with open(self.log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
