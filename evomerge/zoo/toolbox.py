"""The zoo's second family, for the toolbox commands: what soups, SWA and Re-Basin need.

Built on a finished zoo (its base and tokenizer), in the same pinned child process, so it
is the same family on every AVX2 CPU. Layout (ordinary HF dirs)::

    soup/<name>/      more fine-tunes of one skill from the zoo's base, other hyperparameters
                      (with the zoo's own specialist of that skill: the ingredients of a soup)
    swa/stepNNNN/     iterates of one fine-tune at a constant learning rate (what SWA averages)
    pair/a  pair/b    two models trained from scratch on the same data (the same batches in the
                      same order) from different initializations: the pair permutation
                      alignment is for
    toolbox.json      settings, their hash, the zoo's hash, the weights' sha256
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from evomerge.errors import UserError, nearest
from evomerge.zoo.build import (
    PRESETS as ZOO_PRESETS,
    check_mkl_branch,
    in_build_env,
    quiet_transformers,
    read_manifest,
    run_pinned,
    swap_into_place,
    torch_capability,
)
from evomerge.zoo.data import SKILLS, specialist_mixture, training_mixture
from evomerge.zoo.train import Schedule, constant_lr, init_model, make_config, torch_threads, train

TOOLBOX_FORMAT = 1
MANIFEST = "toolbox.json"
DEFAULT_DIR = Path("runs/zoo_toolbox")


@dataclass(frozen=True)
class Ingredient:
    name: str
    lr: float
    own_share: float
    data_seed: int


@dataclass(frozen=True)
class ToolboxSettings:
    preset: str
    skill: str  # the skill of the soup ingredients and of the SWA run
    ingredients: tuple[Ingredient, ...]
    swa: Schedule  # constant learning rate after warm-up
    swa_every: int
    swa_from: int
    pair: Schedule
    pair_seeds: tuple[int, int]  # initializations; the data stream is the same for both
    pair_own_share: float  # share of the three skills (short format) in the pair's data

    def digest(self, zoo_hash: str) -> str:
        blob = json.dumps({"format": TOOLBOX_FORMAT, "zoo": zoo_hash, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def model_dirs(self) -> list[str]:
        swa = [swa_dir(s) for s in range(self.swa_from, self.swa.steps + 1, self.swa_every)]
        return [f"soup/{i.name}" for i in self.ingredients] + swa + ["pair/a", "pair/b"]


def swa_dir(step: int) -> str:
    return f"swa/step{step:04d}"


def _preset(zoo_preset: str, ingredients, swa_steps: int, swa_every: int, pair: Schedule) -> ToolboxSettings:
    spec = ZOO_PRESETS[zoo_preset].specialist_schedule("mir")
    # The SWA run takes plain steps, not the zoo's sharpness-aware ones: averaging its iterates
    # is the flat-minimum method it shows. (The soup ingredients train as the zoo's mir does.)
    return ToolboxSettings(
        preset=zoo_preset, skill="mir", ingredients=ingredients,
        swa=replace(spec, steps=swa_steps, sam_rho=0.0), swa_every=swa_every, swa_from=swa_steps // 2,
        pair=pair, pair_seeds=(1, 2), pair_own_share=0.5,
    )


# The pair trains with AdamW weight decay (0.1): without it most of each weight matrix is its
# random initialization, which no gradient ever asked for and which differs between the two
# seeds, so comparing weights (Re-Basin's weight matching) matched noise and left 77 % of the
# midpoint barrier; with it the weights are the features the data made, and weight matching
# with rotations left 43 % (bench/RESULTS.md, sixth session).
PAIR_WEIGHT_DECAY = 0.1

# Ingredients differ in learning rate, data share and data order from the zoo's own mir
# specialist (lr 0.042, share 0.35): a good soup keeps the good ones, a greedy soup drops the
# harmful (too high a rate, too little replay).
PRESETS = {
    "default": _preset(
        "default",
        (Ingredient("mir_lr0.021", 0.021, 0.35, 11), Ingredient("mir_lr0.084", 0.084, 0.35, 12),
         Ingredient("mir_share0.9", 0.042, 0.9, 13)),
        swa_steps=800, swa_every=100,
        pair=Schedule(steps=1500, lr=3e-3, warmup=100, batch_size=64, weight_decay=PAIR_WEIGHT_DECAY),
    ),
    "tiny": _preset(
        "tiny",
        (Ingredient("mir_lr0.05", 0.05, 0.5, 11), Ingredient("mir_lr0.2", 0.2, 0.5, 12)),
        swa_steps=40, swa_every=10,
        pair=Schedule(steps=60, lr=1e-2, warmup=10, batch_size=32, weight_decay=PAIR_WEIGHT_DECAY),
    ),
}


def build_toolbox(out_dir: str | Path = DEFAULT_DIR, zoo_dir: str | Path = "runs/zoo", progress: bool = True,
                  threads: int = 2) -> Path:
    """Build (or find cached) the toolbox family of the zoo at ``zoo_dir``; returns its path."""
    zoo, out = Path(zoo_dir), Path(out_dir)
    zoo_manifest = read_manifest(zoo)
    if zoo_manifest is None:
        raise UserError(f"{zoo} is not a built zoo (no zoo.json); run `evomerge zoo build {zoo}` first")
    preset = zoo_manifest["settings"]["preset"]
    if preset not in PRESETS:
        raise UserError(f"no toolbox family for zoo preset {preset!r}{nearest(preset, PRESETS)}")
    settings = PRESETS[preset]
    digest = settings.digest(zoo_manifest["hash"])
    manifest = read_toolbox(out)
    if manifest and manifest.get("hash") == digest and all((out / d / "config.json").is_file() for d in settings.model_dirs()):
        return out
    if out.exists() and any(out.iterdir()) and manifest is None:
        raise UserError(f"{out} exists and is not a toolbox family (no {MANIFEST}); pass an empty or new directory")
    if not in_build_env():
        return run_pinned("evomerge.zoo.toolbox", [str(out), "--zoo", str(zoo), "--threads", str(threads)],
                          threads, progress, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        started = time.perf_counter()
        branch = check_mkl_branch()
        with torch_threads(threads):
            losses = _train_all(settings, zoo, tmp, zoo_manifest, progress)
        manifest = {
            "settings": asdict(settings), "hash": digest, "zoo": str(zoo.resolve()), "zoo_hash": zoo_manifest["hash"],
            "models": settings.model_dirs(), "final_loss": losses, "cpu_capability": torch_capability(), "mkl_branch": branch,
            "weights_sha256": _weights_digest(tmp, settings.model_dirs()), "build_s": round(time.perf_counter() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_toolbox(out: str | Path) -> dict | None:
    try:
        return json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _weights_digest(root: Path, dirs: list[str]) -> str:
    h = hashlib.sha256()
    for d in dirs:
        h.update((root / d / "model.safetensors").read_bytes())
    return h.hexdigest()


def _train_all(settings: ToolboxSettings, zoo: Path, root: Path, zoo_manifest: dict, progress: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    base = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype="float32")
    spec = ZOO_PRESETS[settings.preset].specialist_schedule(settings.skill)
    zoo_seed = zoo_manifest["settings"]["seed"]

    def save(model, rel: str) -> None:
        with quiet_transformers():
            model.save_pretrained(root / rel)
        tokenizer.save_pretrained(root / rel)

    losses: dict[str, float] = {}
    for ing in settings.ingredients:
        model = copy.deepcopy(base)
        rng = np.random.default_rng([zoo_seed, 100, ing.data_seed])
        got = train(model, tokenizer, specialist_mixture(settings.skill, ing.own_share), replace(spec, lr=ing.lr),
                    rng, f"soup {ing.name}", progress=progress)
        losses[f"soup/{ing.name}"] = float(np.mean(got[-50:]))
        save(model, f"soup/{ing.name}")

    model = copy.deepcopy(base)

    def checkpoint(step: int) -> None:
        if step >= settings.swa_from and (step - settings.swa_from) % settings.swa_every == 0:
            save(model, swa_dir(step))

    rng = np.random.default_rng([zoo_seed, 200])
    got = train(model, tokenizer, specialist_mixture(settings.skill), settings.swa, rng, "swa run", checkpoint,
                progress, lr_shape=constant_lr)
    losses["swa"] = float(np.mean(got[-50:]))

    # Every skill in the short format beside the base mixture: both models of the pair can do
    # the zoo's tasks, so a path between them shows a task score as well as a loss.
    mixture = training_mixture(list(SKILLS), settings.pair_own_share)
    shape = ZOO_PRESETS[settings.preset].shape
    for name, init_seed in zip("ab", settings.pair_seeds):
        model = init_model(make_config(shape, tokenizer), 1000 * zoo_seed + init_seed)
        rng = np.random.default_rng([zoo_seed, 300])  # the same batches for both
        got = train(model, tokenizer, mixture, settings.pair, rng, f"pair {name}", progress=progress)
        losses[f"pair/{name}"] = float(np.mean(got[-50:]))
        save(model, f"pair/{name}")
    return losses


def _main() -> None:
    """The build's child process (see build.PINNED_ENV): same arguments as `evomerge zoo toolbox`."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--zoo", default="runs/zoo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if not in_build_env():
        raise SystemExit("run `evomerge zoo toolbox`, which starts this with the pinned environment")
    try:
        build_toolbox(args.out_dir, args.zoo, progress=not args.quiet, threads=args.threads)
    except UserError as e:
        raise SystemExit(f"evomerge: error: {e}") from None


if __name__ == "__main__":
    _main()
