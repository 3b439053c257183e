"""Compute a model's statistics once: safetensors files keyed by everything they depend on.

The key is the sha256 of the model's content (its weight files, config and tokenizer,
each hashed by content; those hashes are remembered by path, size and mtime, so a
second call reads no weights to key them), the calibration spec's digest, the kind of
statistic and its settings. Files live in ``$EVOMERGE_CACHE/stats`` (default
``~/.cache/evomerge/stats``, beside the converted SmolLM2) and are written to a
temporary name and renamed into place, so a reader never sees half a file and two
processes computing the same key each leave a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from evomerge.errors import UserError
from evomerge.io.model_dir import ModelDir
from evomerge.io.writer import TOKENIZER_FILES, atomic_write_text, fsync_path, sha256_file
from evomerge.stats.calibration import CalibrationSpec, batches, load_texts

FORMAT = 1  # bump when a kind's computation changes: old files are then never read
_HASHES = "file_hashes.json"
# Files that change what a statistic is: the weights, how they are wired, how text becomes ids.
_MODEL_FILES = ("config.json",) + tuple(f for f in TOKENIZER_FILES if f != "generation_config.json")


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge") / "stats"


def fisher_stats(model_dir: str | os.PathLike, spec: CalibrationSpec, labels: str = "sampled", seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = None) -> Path:
    """A safetensors file: each parameter's Fisher diagonal (float32) under its name in the model's files.

    ``labels``: "sampled" (the true Fisher, targets drawn with ``seed``) or "data" (the
    empirical Fisher); see evomerge/stats/fisher.py. ``threads``: torch's intra-op
    threads while computing (None leaves torch's setting); not part of the key."""
    from evomerge.stats.fisher import LABELS

    if labels not in LABELS:
        raise UserError(f"fisher labels must be one of {list(LABELS)}, got {labels!r}")
    settings = {"labels": labels, "seed": int(seed) if labels == "sampled" else None}
    return _cached("fisher", model_dir, spec, settings, cache_dir, lambda md, tmp: _write_fisher(md, spec, labels, seed, tmp, device), threads)


def gram_stats(model_dir: str | os.PathLike, spec: CalibrationSpec, dtype: torch.dtype | str = torch.float32,
               cache_dir: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = None) -> Path:
    """A safetensors file of each linear layer's input Gram matrix; read it with
    ``evomerge.stats.gram.GramFile`` (aliases, token counts, Conv1D layout in its metadata).
    ``dtype``: how the sums are stored (they accumulate in float64 either way)."""
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.float64):
        raise UserError(f"gram dtype must be float32 or float64, got {dtype}")
    settings = {"dtype": str(dtype).removeprefix("torch.")}
    return _cached("gram", model_dir, spec, settings, cache_dir, lambda md, tmp: _write_gram(md, spec, dtype, tmp, device), threads)


def stats_path(kind: str, model_dir: str | os.PathLike | ModelDir, spec: CalibrationSpec, settings: dict,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the statistic with this key lives (whether or not it has been computed)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    blob = json.dumps({"format": FORMAT, "kind": kind, "model": model_hash(model_dir, root),
                       "calibration": spec.digest(), "settings": settings}, sort_keys=True)
    return root / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.safetensors"


def _cached(kind, model_dir, spec, settings, cache_dir, compute, threads) -> Path:
    from evomerge.zoo.train import torch_threads

    md = ModelDir(model_dir)
    path = stats_path(kind, md, spec, settings, cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # A small model's many tiny matmuls run faster on one thread than on two that
        # contend for a busy machine's cores; the caller knows which case it is in.
        with torch_threads(threads):
            compute(md, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- computing


def _load(md: ModelDir, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(md.path)
    except (OSError, ValueError, TypeError):
        raise UserError(f"{md.path}: no usable tokenizer; statistics tokenize the calibration texts with the model's own, copy its tokenizer files in") from None
    # float32 whatever the stored dtype: squared gradients and Gram sums in bf16 would round away most of their bits
    model = AutoModelForCausalLM.from_pretrained(md.path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def _write_fisher(md: ModelDir, spec: CalibrationSpec, labels: str, seed: int, out: Path, device: str) -> None:
    from safetensors.torch import save_file

    from evomerge.stats.fisher import compute_fisher

    model, tokenizer = _load(md, device)
    model.requires_grad_(True)
    data = batches(tokenizer, load_texts(spec), spec)
    started = time.perf_counter()
    fishers, examples = compute_fisher(model, data, labels=labels, seed=seed, names=_file_names(model, md))
    if examples == 0:
        raise UserError("no calibration text is two tokens long after tokenizing; the Fisher needs a next token to predict (raise max_length or use longer texts)")
    meta = {"evomerge.kind": "fisher", "format": str(FORMAT), "labels": labels, "seed": str(seed),
            "examples": str(examples), "seconds": f"{time.perf_counter() - started:.1f}"}
    save_file({n: t.contiguous().cpu() for n, t in fishers.items()}, str(out), metadata=meta)
    fsync_path(out)


def _write_gram(md: ModelDir, spec: CalibrationSpec, dtype: torch.dtype, out: Path, device: str) -> None:
    from evomerge.stats.gram import compute_grams

    model, tokenizer = _load(md, device)
    data = batches(tokenizer, load_texts(spec), spec)
    compute_grams(model, data, out, dtype=dtype)


def _file_names(model, md: ModelDir) -> dict[str, str]:
    """Each parameter's name as the model's files spell it (a tied one is stored under one of its names)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    out = {}
    for name, p in model.named_parameters():
        stored = [n for n in by_tensor[id(p)] if n in md.entries]
        out[name] = stored[0] if stored else name
    return out



# ----------------------------------------------------------------------------- model hash


def model_hash(model_dir: str | os.PathLike | ModelDir, cache_dir: Path) -> str:
    """sha256 over the model's weight shards, config and tokenizer files, by content."""
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    files = sorted({e.path for e in md.entries.values()} | {md.path / f for f in _MODEL_FILES if (md.path / f).is_file()})
    known = _read_hashes(cache_dir)
    parts, changed = [], False
    for f in files:
        st = f.stat()
        where = str(f.resolve())
        entry = known.get(where)
        if not entry or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)}
            known[where], changed = entry, True
        parts.append((f.name, entry["sha256"]))
    if changed:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_dir / _HASHES, json.dumps(known, indent=1, sort_keys=True) + "\n")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _read_hashes(cache_dir: Path) -> dict:
    try:
        data = json.loads((cache_dir / _HASHES).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}

