"""The real mergekit, for the parity tests: find its ``mergekit-yaml``, or build it a venv.

mergekit lives in a virtualenv of its own: it pins its own transformers and
accelerate, which must not leak into evomerge's environment, and it is LGPL, so
evomerge only ever runs it as a program, never imports it.

Where: ``$EVOMERGE_MERGEKIT_VENV`` when set, else ``<repo>/.venv-mergekit``. A
missing venv is created (``python -m venv``, then its pip installs
``torch==2.13.0 mergekit==0.1.5``), so the parity tests never skip for want of
mergekit; a failed install fails them with pip's own words.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
# the torch evomerge pins too: the same CPU kernels on both sides of a comparison
REQUIREMENTS = ("torch==2.13.0", f"mergekit=={MERGEKIT_VERSION}")
REPO = Path(__file__).resolve().parents[1]
_INSTALLING = ".evomerge-installing"  # present while we build: a venv holding it is half-finished


class MergekitUnavailable(RuntimeError):
    pass


def venv_dir() -> Path:
    given = os.environ.get("EVOMERGE_MERGEKIT_VENV")
    return Path(given).expanduser().resolve() if given else REPO / ".venv-mergekit"


def _installed_version(venv: Path) -> str | None:
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True, env=_clean_env(),
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_mergekit(log=print) -> Path:
    """The ``mergekit-yaml`` of mergekit 0.1.5, installing it first when needed."""
    venv = venv_dir()
    exe = venv / "bin" / "mergekit-yaml"
    venv.parent.mkdir(parents=True, exist_ok=True)
    # one installer at a time: two test sessions may start together
    with open(venv.parent / f".{venv.name.lstrip('.')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.is_file() and not (venv / _INSTALLING).exists():
            version = _installed_version(venv)
            if version == MERGEKIT_VERSION:
                return exe
            raise MergekitUnavailable(
                f"{venv} holds mergekit {version}, the parity tests compare with {MERGEKIT_VERSION}: "
                f"point EVOMERGE_MERGEKIT_VENV at a venv with mergekit {MERGEKIT_VERSION}, or unset it to use "
                f"{REPO / '.venv-mergekit'}")
        if (venv / _INSTALLING).exists():
            shutil.rmtree(venv)  # our own install, interrupted
        elif venv.exists() and any(venv.iterdir()):
            raise MergekitUnavailable(f"{venv} exists but has no bin/mergekit-yaml; point EVOMERGE_MERGEKIT_VENV "
                                      "at a venv with mergekit installed, or at a new folder to build one there")
        log(f"creating {venv} with {' '.join(REQUIREMENTS)} (once; later runs reuse it)")
        venv.mkdir(parents=True, exist_ok=True)
        (venv / _INSTALLING).write_text(" ".join(REQUIREMENTS) + "\n")
        for step in ([sys.executable, "-m", "venv", str(venv)],
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *REQUIREMENTS]):
            done = subprocess.run(step, capture_output=True, text=True, env=_clean_env())
            if done.returncode != 0:
                raise MergekitUnavailable(
                    f"installing mergekit for the parity tests failed: `{' '.join(step)}` exited {done.returncode}:\n"
                    f"{done.stderr.strip() or done.stdout.strip()}")
        if not exe.is_file():
            raise MergekitUnavailable(f"pip installed mergekit=={MERGEKIT_VERSION} but {exe} is missing")
        (venv / _INSTALLING).unlink()
        return exe


def _clean_env() -> dict[str, str]:
    """This process's environment minus what would point mergekit's python at ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env


def _run_env() -> dict[str, str]:
    return _clean_env() | {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
        # mergekit takes the output config from referenced_models()[0] when there is no
        # base_model, and that list comes out of a set: fix the hash seed so it is one model
        "PYTHONHASHSEED": "0",
        # torch's CPU reductions may split differently with more threads; evomerge's side
        # of a comparison is free to, as long as mergekit's is fixed
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _options(seed: int, copy_tokenizer: bool) -> list[str]:
    # --random-seed: DARE's masks come from torch's global RNG, seeded per merge with it
    return ["--device", "cpu", "--num-threads", "1", "--random-seed", str(seed), "--no-write-model-card", "--quiet",
            "--copy-tokenizer" if copy_tokenizer else "--no-copy-tokenizer"]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_run_env())
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}) on {what}:\n{done.stderr.strip()[-4000:]}")


def run_mergekit(recipe_path: str | Path, out_dir: str | Path, *, copy_tokenizer: bool = False,
                 seed: int = 0, exe: Path | None = None) -> Path:
    """``mergekit-yaml RECIPE OUT`` on the CPU, offline and deterministic; raises with its
    stderr when it fails. Returns ``out_dir``."""
    exe = exe or ensure_mergekit()
    _run([str(exe), str(recipe_path), str(out_dir), *_options(seed, copy_tokenizer)], str(recipe_path))
    return Path(out_dir)


def run_mergekit_many(recipes: dict[str, dict], root: str | Path, *, seed: int = 0, exe: Path | None = None) -> dict[str, Path]:
    """Many recipes in one mergekit process (``mergekit-multi``, each recipe a named YAML
    document): ``{name: out_dir}``. Each merge costs ~0.1 s there against ~8 s for a
    ``mergekit-yaml`` process, nearly all of it imports. Every merge runs ``run_merge``, as
    ``mergekit-yaml`` does, with the RNG seeded anew per merge."""
    import yaml

    exe = exe or ensure_mergekit()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    docs = root / "recipes.yaml"
    # mergekit-multi reads any string in a recipe that equals a merge's name as a reference
    # to that merge's output (a merge named "dare_linear" would depend on itself): numbered names
    dirs = {name: f"evomerge_case_{i:04d}" for i, name in enumerate(recipes)}
    docs.write_text(yaml.safe_dump_all([{"name": dirs[name], **recipe} for name, recipe in recipes.items()], sort_keys=False))
    _run([str(exe.parent / "mergekit-multi"), str(docs), "-I", str(root), "--no-lazy", *_options(seed, False),
          "--lora-merge-cache", str(root / "lora_cache")], str(docs))
    return {name: root / d for name, d in dirs.items()}
