"""Build the toy model family: a base, one specialist per skill, checkpoints along one fine-tune.

Layout of the output directory (every model dir is an ordinary HF dir with its tokenizer)::

    base/  mir/  sft/  srt/  mir_ckpt/step100/ ...  zoo.json

``zoo.json`` holds the settings and their hash; a second call with the same settings
returns at once. The zoo is written to a temporary sibling directory and renamed into
place, so an interrupted build leaves nothing half-written under ``out_dir``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from transformers.utils import logging as hf_logging

from evomerge.errors import UserError, nearest
from evomerge.zoo.data import BASE_MIXTURE, SKILLS, specialist_mixture
from evomerge.zoo.mkl_branch import active_branch, compiler, cpu_vendor, vendor_shim
from evomerge.zoo.tokenizer import build_tokenizer
from evomerge.zoo.train import ModelShape, Schedule, init_model, make_config, torch_threads, train

ZOO_FORMAT = 5  # bump when the data or training code changes what a setting produces
MANIFEST = "zoo.json"
DEFAULT_DIR = Path("runs/zoo")


@dataclass(frozen=True)
class ZooSettings:
    seed: int
    preset: str
    shape: ModelShape
    base: Schedule
    specialist: Schedule
    own_share: float  # share of the specialist's own skill; the rest replays the base mixture
    skills: tuple[str, ...]
    specialist_lr: tuple[float, ...]  # each skill's fine-tuning rate, in the order of ``skills``
    checkpoint_skill: str
    checkpoint_steps: tuple[int, ...]

    def specialist_schedule(self, skill: str) -> Schedule:
        return replace(self.specialist, lr=self.specialist_lr[self.skills.index(skill)])

    def digest(self) -> str:
        """Hash of what the zoo is (not the thread count: the pinned build's bits do not depend on it)."""
        blob = json.dumps({"format": ZOO_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The same zoo, bit for bit, on every x86-64 CPU with AVX2, Intel or AMD, for any thread count:
# torch's own kernels pinned to their AVX2 code paths (an AVX-512 CPU would otherwise run
# AVX-512 kernels, whose sums round differently) and MKL's matrix products to its AVX2 branch
# in STRICT mode (bitwise the same for any thread count), which MKL keeps on another vendor's
# CPU only with the vendor shim of mkl_branch.py (run_pinned preloads it). MKL's COMPATIBLE
# branch, the earlier pin, rounded differently on an Intel Xeon and an AMD EPYC and cost 2.8x
# per step (`python bench/bench_zoo_pin.py`; bench/RESULTS.md, ninth session). Read once, when
# torch and MKL load, so a build runs in a child process started with them.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
PINNED_MKL_BRANCH = "AVX2"  # what mkl_branch.active_branch() reports in a pinned child


# The specialists fine-tune with SGD, not AdamW: AdamW moves every weight by about lr per
# step whatever its gradient, so its task vectors were mostly noise (a 13 % change in every
# matrix) and three of them added up to a broken model. SGD moves weights in proportion to
# their gradients. Each specialist rebinds one tag the base copies on to a skill the base
# knows under another tag (zoo/data.py), gently (300 steps, a third of its data its own
# skill): a change small enough that task vectors add up into merges that keep most of every
# skill, while which merge keeps all of them still depends on the recipe. The three were
# fine-tuned at different rates (mir 1.4x sft's, srt 0.7x), as fine-tunes from different
# hands are, so that each model's weight matters, not only one global strength.
# The steps are sharpness-aware (SAM, train.sam_gradient), radius 0.05: a specialist in a flat
# minimum keeps its skill when the others' task vectors are added, so a hand merge holds on 17
# of seeds 0-19 (plain steps: 14; two specialists' rebindings collided on the others). Radius
# 0.1 held 17 of the 18 measured but made task arithmetic as good as any recipe on seed 0
# (0.998, the search's own score), leaving the search nothing to beat
# (`python bench/zoo_specialists.py --sam-rho R`; bench/RESULTS.md, 13th and 14th sessions).
# The earlier family (a base that knew the skills only in the verbose format, 600 steps at
# lr 0.1) made merges that broke on most seeds (best hand merge 0.40-0.93 on seeds 0-4) and
# took 2.2x the training steps (bench/RESULTS.md, tenth session).
PRESETS: dict[str, ZooSettings] = {
    "default": ZooSettings(
        seed=0,
        preset="default",
        shape=ModelShape(hidden=128, layers=4, intermediate=384, heads=4),
        base=Schedule(steps=1500, lr=3e-3, warmup=100, batch_size=64),
        specialist=Schedule(steps=300, lr=0.03, warmup=30, batch_size=64, optimizer="sgd", sam_rho=0.05),
        own_share=0.35,
        skills=tuple(SKILLS),
        specialist_lr=(0.042, 0.03, 0.021),
        checkpoint_skill="mir",
        checkpoint_steps=(100, 200, 300),
    ),
    # Seconds, for tests: same layout, weak models (a few exact matches, mostly by chance).
    "tiny": ZooSettings(
        seed=0,
        preset="tiny",
        shape=ModelShape(hidden=32, layers=2, intermediate=64, heads=2),
        base=Schedule(steps=200, lr=1e-2, warmup=20, batch_size=32),
        specialist=Schedule(steps=40, lr=0.1, warmup=5, batch_size=32, optimizer="sgd"),
        own_share=0.5,
        skills=tuple(SKILLS),
        specialist_lr=(0.1, 0.1, 0.1),
        checkpoint_skill="mir",
        checkpoint_steps=(20, 40),
    ),
}


def zoo_settings(preset: str = "default", seed: int = 0) -> ZooSettings:
    if preset not in PRESETS:
        raise UserError(f"unknown zoo preset {preset!r}{nearest(preset, PRESETS)}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], seed=seed)


def checkpoint_dir(skill: str, step: int) -> str:
    return f"{skill}_ckpt/step{step}"


def read_manifest(zoo_dir: str | Path) -> dict | None:
    path = Path(zoo_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_complete(zoo_dir: Path, manifest: dict | None, digest: str) -> bool:
    if manifest is None or manifest.get("hash") != digest:
        return False
    dirs = list(manifest["models"].values()) + [d for ds in manifest["checkpoints"].values() for d in ds]
    return all((zoo_dir / d / "config.json").is_file() for d in dirs)


def build_zoo(
    out_dir: str | Path = DEFAULT_DIR,
    seed: int = 0,
    preset: str = "default",
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Build (or find cached) the zoo under ``out_dir``; returns its path.

    ``threads``: the cores training may use (default 2; on a busy machine threads spin against
    each other): the base trains with that many torch threads, then with more than one the
    specialists train side by side, a process each (_train_specialists), one after another
    otherwise. Pinned, the weights do not depend on it.
    """
    settings = zoo_settings(preset, seed)
    threads = 2 if threads is None else threads
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    digest = settings.digest()
    out = Path(out_dir)
    if _is_complete(out, read_manifest(out), digest):
        return out
    if out.exists() and any(out.iterdir()) and read_manifest(out) is None:
        raise UserError(f"{out} exists and is not a zoo (no {MANIFEST}); pass an empty or new directory")
    if not in_build_env():
        return _build_in_child(out, seed, preset, threads, progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        branch = check_mkl_branch()
        with torch_threads(threads):
            manifest = _train_all(settings, tmp, progress, threads)
        manifest["hash"] = digest
        manifest["cpu_capability"] = torch_capability()  # AVX2 when pinned, whatever the CPU
        manifest["pinned_env"] = {k: os.environ[k] for k in PINNED_ENV if k in os.environ}
        manifest["mkl_branch"], manifest["threads"] = branch, threads
        manifest["weights_sha256"] = weights_digest(tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def torch_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def weights_digest(zoo: Path, manifest: dict) -> str:
    """sha256 over every model file of the zoo, in manifest order: the family, bit for bit."""
    h = hashlib.sha256()
    dirs = list(manifest["models"].values()) + [d for ds in manifest["checkpoints"].values() for d in ds]
    for d in dirs:
        h.update((Path(zoo) / d / "model.safetensors").read_bytes())
    return h.hexdigest()


# The families trained under PINNED_ENV; the default one is what the README and
# docs/methods.md report. This one (sharpness-aware specialists) was trained on an AMD EPYC
# Zen 4 (AVX-512) and again, bit for bit, on a Zen 3 (AVX2 only), both 2026-12-07; the pin
# gave the plain-SGD family before it (743501434c91...) the same bits on an Intel Xeon
# (Sapphire Rapids) and that Zen 4, and the formats before that the same bits on an Intel
# Xeon and an AMD EPYC (bench/RESULTS.md, ninth to twelfth and sixteenth sessions).
REFERENCE_WEIGHTS = {
    ("default", 0): "31ffd014676725263b8e8bb7cef925daf9e21552939e578be0ae9217606bf62b",
    ("tiny", 0): "4f1e5b7684371f35172a802cebc73f9a3d2bca0d2ada4267de861a7af1047118",
}


def check_reference(zoo: Path) -> str | None:
    """A warning when ``zoo`` is a preset and seed with a reference family and its bits differ."""
    m = read_manifest(zoo) or {}
    s = m.get("settings", {})
    want = REFERENCE_WEIGHTS.get((s.get("preset"), s.get("seed")))
    if want is None or m.get("weights_sha256") == want:
        return None
    return (f"this zoo's weights differ from the reference family (sha256 {m.get('weights_sha256', '?')[:12]} vs "
            f"{want[:12]}): the toy results the README reports will not hold here; please report your CPU and torch version")


_UNPINNED = "EVOMERGE_ZOO_UNPINNED"  # set for the child on a CPU without AVX2


def in_build_env() -> bool:
    """Whether this process was started with the build's environment (torch reads it at load)."""
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items()) or os.environ.get(_UNPINNED) == "1"


def pinnable() -> bool:
    """Whether this CPU runs the pinned (AVX2) code paths: x86-64 with AVX2 and FMA."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split(":", 1)[1].split())


def _build_in_child(out: Path, seed: int, preset: str, threads: int, progress: bool) -> Path:
    args = [str(out), "--seed", str(seed), "--preset", preset, "--threads", str(threads)]
    return run_pinned("evomerge.zoo.build", args, threads, progress, out)


def run_pinned(module: str, args: list[str], threads: int, progress: bool, out: Path) -> Path:
    """Run ``python -m module args`` in a child started with pinned_env(threads); the child's
    last stderr line becomes the error when it fails."""
    cmd = [sys.executable, "-m", module, *args] + ([] if progress else ["--quiet"])
    done = subprocess.run(cmd, env=pinned_env(threads), stdout=subprocess.DEVNULL,
                          stderr=None if progress else subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise UserError(f"zoo build failed: {_last_line(done.stderr, done.returncode)}")
    return out


def _last_line(stderr: str | None, returncode: int) -> str:
    """What a failed child said last (its error), or its exit code when it said nothing."""
    said = (stderr or "").strip().splitlines()
    return said[-1] if said else f"exit code {returncode}"


def pinned_env(threads: int) -> dict[str, str]:
    """This process's environment with PINNED_ENV (see there; with the MKL vendor shim preloaded
    on a non-Intel CPU) and ``threads`` threads, for a child that trains; in such a child, its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if in_build_env():
        return env
    if pinnable():
        env.update(PINNED_ENV)
        if cpu_vendor() != "GenuineIntel":
            from evomerge.zoo.smollm2 import cache_root

            shim = vendor_shim(cache_root())
            if shim is not None:
                env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD")]))
    else:
        print("evomerge: warning: this CPU has no AVX2, so this zoo will not be bit-identical to other machines' "
              "(the README's toy results may not hold here)", file=sys.stderr)
        env[_UNPINNED] = "1"
    return env


def check_mkl_branch() -> str:
    """MKL's branch in this (pinned) child, with a warning before any training when it is not
    the pinned one: the zoo will then be this machine's own family."""
    branch = active_branch()
    if os.environ.get(_UNPINNED) != "1" and branch != PINNED_MKL_BRANCH:
        how = ("install a C compiler (cc), with which evomerge builds the shim that keeps MKL on it on "
               f"{cpu_vendor() or 'this'} CPUs") if compiler() is None else "please report your CPU and torch version"
        print(f"evomerge: warning: MKL runs its {branch} branch, not {PINNED_MKL_BRANCH}, so this zoo will not be "
              f"bit-identical to other machines' (the README's toy results may not hold here); {how}", file=sys.stderr)
    return branch


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` (an older zoo, if any) by ``tmp`` with renames only."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def quiet_transformers():
    """Hide transformers' per-save "Writing model shards" bar; our own bar shows progress."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def train_base(settings: ZooSettings, tokenizer, progress: bool = True):
    """The zoo's base model, trained from ``settings.seed``; returns (model, losses)."""
    base = init_model(make_config(settings.shape, tokenizer), settings.seed)
    rng = np.random.default_rng([settings.seed, 0])
    return base, train(base, tokenizer, BASE_MIXTURE, settings.base, rng, "zoo base", progress=progress)


def train_specialist(settings: ZooSettings, base, skill: str, tokenizer, progress: bool = True,
                     on_step: Callable[[int, object], None] | None = None, stream: int = 0, position: int = 0):
    """``skill``'s specialist, fine-tuned from a copy of ``base``; returns (model, losses).
    ``on_step(k, model)`` runs after the k-th step. Its data stream depends on the seed, the
    skill and ``stream`` only (0: the build's), not on the other specialists."""
    model = copy.deepcopy(base)
    rng = np.random.default_rng([settings.seed, settings.skills.index(skill) + 1] + ([stream] if stream else []))
    mixture = specialist_mixture(skill, settings.own_share)
    hook = None if on_step is None else (lambda step: on_step(step, model))
    losses = train(model, tokenizer, mixture, settings.specialist_schedule(skill), rng, f"zoo {skill}", hook, progress,
                   position=position)
    return model, losses


def _save(model, tokenizer, root: Path, rel: str) -> None:
    with quiet_transformers():
        model.save_pretrained(root / rel)
    tokenizer.save_pretrained(root / rel)


def _checkpoints(settings: ZooSettings) -> dict[str, list[str]]:
    """The checkpoint dirs the build saves along its checkpoint skill's fine-tune."""
    steps = [k for k in settings.checkpoint_steps if k <= settings.specialist_schedule(settings.checkpoint_skill).steps]
    return {settings.checkpoint_skill: [checkpoint_dir(settings.checkpoint_skill, k) for k in steps]} if steps else {}


def _train_all(settings: ZooSettings, root: Path, progress: bool, threads: int) -> dict:
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    losses = {}
    base, losses["base"] = train_base(settings, tokenizer, progress)
    _save(base, tokenizer, root, "base")
    losses.update(_train_specialists(settings, root, progress, threads))
    return {
        "settings": asdict(settings),
        "format": ZOO_FORMAT,
        "models": {"base": "base", **{s: s for s in settings.skills}},
        "checkpoints": _checkpoints(settings),
        "final_loss": {k: float(np.mean(v[-50:])) for k, v in losses.items()},
        "build_s": round(time.perf_counter() - started, 1),
    }


def _train_specialists(settings: ZooSettings, root: Path, progress: bool, threads: int,
                       jobs: int | None = None) -> dict[str, list[float]]:
    """Fine-tune the specialists from ``root/base``, each in its own child process (this one's
    pinned environment), ``jobs`` at a time (default: all of them when ``threads`` > 1), each
    with ``threads // jobs`` threads (at least one); returns each one's losses.

    Why processes: these models are too small for a second torch thread to do much for a step,
    so three single-thread processes sharing the cores finish well before the three fine-tunes
    would one after another at two threads (`python
    bench/bench_zoo_build.py`, bench/RESULTS.md). Each depends on the base and its own data
    stream only, and the pinned kernels give the same bits for any thread count, so the zoo is
    the same either way."""
    jobs = jobs or (len(settings.skills) if threads > 1 else 1)
    per_job = max(1, threads // jobs)
    env = pinned_env(per_job)
    pending = list(enumerate(settings.skills))
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    losses: dict[str, list[float]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i, skill = pending.pop(0)
                err = root / f".{skill}.stderr"
                cmd = [sys.executable, "-m", "evomerge.zoo.build", str(root), "--seed", str(settings.seed),
                       "--preset", settings.preset, "--threads", str(per_job), "--specialist", skill,
                       "--position", str(i if jobs > 1 else 0)] + ([] if progress else ["--quiet"])
                with open(err, "w") as fh:
                    running[skill] = (subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                       stderr=None if progress else fh), err)
            for skill, (proc, err) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[skill]
                said = err.read_text()
                err.unlink()
                if proc.returncode != 0:
                    raise UserError(f"zoo build failed ({skill}): {_last_line(said, proc.returncode)}")
                losses[skill] = take_losses(root, skill)
            time.sleep(0.2)
    finally:
        for proc, err in running.values():
            proc.kill()
            proc.wait()
            err.unlink()
    return {skill: losses[skill] for skill in settings.skills}


def take_losses(root: Path, skill: str) -> list[float]:
    """The losses _fine_tune_one left for ``skill`` beside the zoo, removed once read."""
    path = root / f".{skill}.losses.json"
    losses = json.loads(path.read_text())
    path.unlink()
    return losses


def _fine_tune_one(root: Path, seed: int, preset: str, skill: str, progress: bool, position: int) -> None:
    """A child of _train_specialists: ``skill``'s specialist from ``root/base`` into ``root/skill``,
    its checkpoints beside it, its losses in ``root/.skill.losses.json``."""
    from safetensors.torch import load_file

    settings = zoo_settings(preset, seed)
    tokenizer = build_tokenizer()
    base = init_model(make_config(settings.shape, tokenizer), settings.seed)
    base.load_state_dict(load_file(root / "base" / "model.safetensors"), strict=True)
    saves = set(_checkpoints(settings).get(skill, []))

    def maybe_checkpoint(step: int, model) -> None:
        if checkpoint_dir(skill, step) in saves:
            _save(model, tokenizer, root, checkpoint_dir(skill, step))

    model, losses = train_specialist(settings, base, skill, tokenizer, progress, maybe_checkpoint, position=position)
    _save(model, tokenizer, root, skill)
    (root / f".{skill}.losses.json").write_text(json.dumps(losses))


def _main() -> None:
    """The build's child process (see PINNED_ENV): same arguments as `evomerge zoo build`."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--specialist", help=argparse.SUPPRESS)  # one fine-tune of _train_specialists
    ap.add_argument("--position", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not in_build_env():
        raise SystemExit("run `evomerge zoo build`, which starts this with the pinned environment")
    try:
        if args.specialist:
            with torch_threads(args.threads):
                _fine_tune_one(Path(args.out_dir), args.seed, args.preset, args.specialist, not args.quiet, args.position)
            return
        build_zoo(args.out_dir, seed=args.seed, preset=args.preset, progress=not args.quiet, threads=args.threads)
    except UserError as e:
        raise SystemExit(f"evomerge: error: {e}") from None


if __name__ == "__main__":
    _main()
