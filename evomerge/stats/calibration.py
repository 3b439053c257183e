"""The calibration set: texts from a JSONL file or an lm-eval task, and their token batches.

A task's text per document is what the model is scored on: the prompt followed by the
target continuation, joined as lm-eval joins them for the task's output type. A spec
names its examples exactly (file content or task, seeded subset), so its ``digest`` can
key cached statistics.
"""

from __future__ import annotations

from evomerge.fitness.env import set_offline_env

set_offline_env()  # before lm_eval pulls in datasets / huggingface_hub

import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evomerge.errors import UserError, nearest  # noqa: E402
from evomerge.io.writer import sha256_file  # noqa: E402

FORMAT = 1  # bump when the same spec would yield other texts or batches


@dataclass(frozen=True)
class CalibrationSpec:
    """Where the calibration texts come from and how they are cut into batches.

    Exactly one of ``data`` (a JSONL file, one object per line, text in ``field``) and
    ``task`` (an lm-eval task or group, looked up in ``task_path``, default the shipped
    tasks, then lm-eval's own). ``limit`` texts at most, a subset drawn with ``seed``.
    """

    data: str | None = None
    task: str | None = None
    task_path: str | None = None
    field: str = "text"
    limit: int = 256
    max_length: int = 64
    batch_size: int = 16
    seed: int = 0
    min_examples: int = 8

    def __post_init__(self) -> None:
        if (self.data is None) == (self.task is None):
            raise UserError("calibration needs exactly one of data: (a JSONL file) or task: (an lm-eval task name)")
        for name in ("limit", "max_length", "batch_size", "min_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"calibration {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"calibration seed must be an integer, got {self.seed!r}")
        if self.max_length < 2:
            raise UserError(f"calibration max_length must be at least 2 (one token and its successor), got {self.max_length}")

    def digest(self) -> str:
        """sha256 of what the batches are made from: settings plus the data's content.

        A data file is hashed as bytes; a task through the texts it yields, because
        those come from its YAML, its loader code and its data together."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("data", "task_path")}
        if self.data is not None:
            content = sha256_file(_data_path(self.data))
        else:
            content = _texts_sha256(_task_texts(self.task, self.task_path))
        blob = json.dumps({"format": FORMAT, "settings": settings, "content": content}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def load_texts(spec: CalibrationSpec) -> list[str]:
    """The calibration texts, in source order: all of them, or a seeded subset of ``limit``."""
    texts = _jsonl_texts(_data_path(spec.data), spec.field) if spec.data is not None else list(_task_texts(spec.task, spec.task_path))
    source = spec.data if spec.data is not None else f"task {spec.task!r}"
    texts = [t for t in texts if t]
    if len(texts) < spec.min_examples:
        raise UserError(
            f"calibration data {source} has {len(texts)} non-empty texts, fewer than min_examples={spec.min_examples}; "
            "add examples or lower min_examples"
        )
    if len(texts) > spec.limit:
        # An own generator: the subset depends on the seed alone, not on global numpy state.
        keep = np.random.default_rng(spec.seed).choice(len(texts), size=spec.limit, replace=False)
        texts = [texts[i] for i in sorted(keep.tolist())]
    return texts


def batches(tokenizer, texts: list[str], spec: CalibrationSpec) -> list[dict[str, torch.Tensor]]:
    """Token batches: ``input_ids`` and ``attention_mask`` (int64), right padded to the
    longest text of the batch, each text cut to ``max_length`` tokens."""
    encoded = [ids for ids in tokenizer(list(texts), truncation=True, max_length=spec.max_length)["input_ids"] if ids]
    if len(encoded) < spec.min_examples:
        raise UserError(
            f"only {len(encoded)} of {len(texts)} calibration texts give any tokens with this tokenizer "
            f"(min_examples={spec.min_examples}); check that the texts are in the model's language and its tokenizer files are right"
        )
    # Padding by hand: the value never matters (masked) and not every tokenizer has a pad token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for start in range(0, len(encoded), spec.batch_size):
        chunk = encoded[start:start + spec.batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# ----------------------------------------------------------------------------- JSONL


def _data_path(data: str) -> Path:
    path = Path(data).expanduser()
    if not path.is_file():
        raise UserError(f"calibration data file {data!r} does not exist; give a JSONL file with one {{\"text\": ...}} object per line")
    return path


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; calibration data must be a UTF-8 JSONL file") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno} is not JSON ({e.msg}); calibration data must be JSONL, one object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an object; write one {{\"{field}\": ...}} object per line")
        if field not in obj:
            raise UserError(
                f"{path}: line {lineno} has no field {field!r}; its fields are {sorted(obj)}{nearest(field, obj)}: "
                "set the calibration field to the one holding the text"
            )
        if not isinstance(obj[field], str):
            raise UserError(f"{path}: line {lineno} field {field!r} is a {type(obj[field]).__name__}, not a string; point field at the text")
        texts.append(obj[field])
    return texts



def _texts_sha256(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- tasks


# Loading lm-eval tasks takes seconds; the statistics of every model of a merge read the
# same task, so its texts are kept for the process (a tuple: callers cannot change them).
@functools.lru_cache(maxsize=8)
def _task_texts(task: str, task_path: str | None) -> tuple[str, ...]:
    from lm_eval.tasks import TaskManager

    from evomerge.tasks import TASK_DIR

    root = Path(task_path).expanduser() if task_path is not None else TASK_DIR
    if not root.is_dir():
        raise UserError(f"task path {task_path!r} is not a directory; pass the folder holding the task YAMLs")
    # Indexing lm-eval's own ~15k tasks takes seconds: only when the name is not found locally.
    tm = TaskManager(include_path=str(root), include_defaults=False)
    if task not in tm.all_tasks:
        tm = TaskManager(include_path=str(root))
        if task not in tm.all_tasks:
            raise UserError(
                f"unknown calibration task {task!r}{nearest(task, tm.all_tasks)}; "
                f"tasks are looked up in {root} (task_path) and lm-eval's own tasks"
            )
    try:
        loaded = tm.load([task])
    except FileNotFoundError as e:
        raise UserError(f"calibration task data not found: {str(e).splitlines()[0]}") from None
    texts: list[str] = []
    for name in sorted(loaded["tasks"]):  # a group: its tasks' documents, in name order
        obj = loaded["tasks"][name]
        texts.extend(_doc_text(obj, doc) for doc in obj.eval_docs)
    return tuple(texts)


def _doc_text(task, doc) -> str:
    """A document as the model is scored on it: prompt then target, joined as lm-eval does."""
    kind = task.OUTPUT_TYPE
    target = task.doc_to_target(doc)
    if kind == "loglikelihood_rolling":
        return str(target)
    prompt = task.doc_to_text(doc)
    prompt = prompt if isinstance(prompt, str) else str(prompt)
    delimiter = task.config.target_delimiter
    if kind == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, list):
            target = target[0]
        return prompt + delimiter + (choices[target] if isinstance(target, int) else str(target))
    if isinstance(target, list):
        target = target[0] if target else ""
    if kind == "loglikelihood":
        return prompt + str(target)  # lm-eval scores this continuation exactly as written
    return prompt + delimiter + str(target)  # generate_until: as a few-shot example is written
