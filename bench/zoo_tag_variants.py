"""What the tasks' tags mean in the base, and whether the specialists' merges collide.

    python bench/zoo_tag_variants.py [--variants copy distinct distinct2 shared unseen unseen_base rare] [--seeds 6] [--hide]
                                     [--root runs/zoo_tag_variants]

In the shipped zoo (zoo/data.py) the base copies on every tag that names no operation, the
three tasks' tags (k, n, o) included, and each specialist rebinds its own tag from copying to
its skill. This script builds the same family with the base taught another meaning for those
three tags, and prints, per seed and variant, the zoo_seeds.py bars (specialists, uniform
merge, best of the hand grid), each pair of specialists summed (task arithmetic, lambda 1:
the pair's two own-skill test scores), which shows which rebindings collide, and where each
specialist switches on along its task vector (switch_points):

- ``copy``: the shipped design (every task tag copies in the base);
- ``distinct``: each task tag names its own operation in the base (k reverse, n rotate left,
  o rotate right), so no two rebindings start from the same function; ``distinct2``: k rotate
  left, n reverse, o rotate right;
- ``shared``: k and n both reverse, o rotates right (two rebindings from one function);
- ``unseen``: the base never sees the task tags, nor does any specialist's replay;
- ``unseen_base``: the base never sees the task tags; each specialist's replay is the
  shipped one (copying on the other two tasks' tags, which the base never saw);
- ``rare``: as ``unseen_base``, but the base copies on each task tag at RARE times the rate
  of any other copy tag (a weak copying prior on them instead of none);
- ``isolated``: the shipped base; each specialist's replay copies on no task tag, its own or
  the others' (shipped: every tag but its own), so no specialist is trained to hold another's
  tag at copying.

A variant's family is built like `evomerge zoo build` (same settings, same pinned child
process; a variant that changes the specialists' data fine-tunes them in that child too, one
after another), with the data module patched in that child only; its zoo.json hash names the
variant, so it is never taken for the shipped zoo (``copy``'s is the shipped zoo's: link
ROOT/copy/seedN to a zoo_seeds.py build to reuse it). ~3.5 min per seed and variant on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from evomerge.zoo.data import SKILLS  # noqa: E402  (numpy only: the parent stays light)

REV, ROL, ROR = ("rev", lambda x: x[::-1]), ("rol", lambda x: x[1:] + x[0]), ("ror", lambda x: x[-1] + x[:-1])
# task tag -> (name, operation) the base learns on it, in the short format over every alphabet
TAG_OPS = {
    "distinct": {"k": REV, "n": ROL, "o": ROR},
    "distinct2": {"k": ROL, "n": REV, "o": ROR},
    "shared": {"k": REV, "n": REV, "o": ROR},
}
VARIANTS = ("copy", "distinct", "distinct2", "shared", "unseen", "unseen_base", "rare", "isolated")
RARE = 0.25  # ``rare``: the base's rate of copying on each task tag, relative to any other copy tag's
TAG_OP_SHARE = 0.03  # of the base's data, per task tag (copy on all 21 copy tags is 0.15)


def variant_format(variant: str, hide: bool = False) -> str:
    """The zoo format a variant's manifest records (never the shipped one, so never taken for it);
    the same after patch_data has set it in this process (zoo_specialists.py asks then)."""
    from evomerge.zoo import build

    shipped = str(build.ZOO_FORMAT).split("-", 1)[0]
    return f"{shipped}-{variant}" + "-hide" * (hide and variant in TAG_OPS)


def patch_data(variant: str, hide: bool) -> None:
    """Rewrite zoo/data.py's base mixture (and the specialists' replay of it) for ``variant``;
    ``hide``: the base's operations on the task tags never show a held-out input, as no other
    example on those tags does (a rotation can equal a skill's answer)."""
    import evomerge.zoo.build as build
    import evomerge.zoo.data as data
    from evomerge.zoo.data import ANY_ALPHABET, Component, Skill

    if variant == "copy":  # the shipped design: the same family, the same hash
        return
    build.ZOO_FORMAT = variant_format(variant, hide)
    task_tags = "".join(data.SKILL_TAGS)
    base_only = tuple((c._replace(skip=task_tags) if c == ("cpy", "short", "") else c, w) for c, w in data.BASE_MIXTURE)
    if variant in ("unseen_base", "rare"):  # the base only: the specialists' replay (data.BASE_MIXTURE) stays the shipped one
        build.BASE_MIXTURE = base_only if variant == "unseen_base" else _rare_copying(base_only, task_tags)
        return
    # the build fine-tunes each specialist in a child process of its own, which would not see
    # the patches below: fine-tune them here instead (the same bits, one after another)
    build._train_specialists = _specialists_in_process
    if variant == "isolated":  # the shipped base; no specialist's replay shows any task tag

        def isolated_mixture(skill: str, own_share: float = 0.5):
            return tuple((c._replace(skip=task_tags) if tuple(c[:2]) == ("cpy", "short") else c, w)
                         for c, w in data.training_mixture([skill], own_share))

        build.specialist_mixture = isolated_mixture
        return
    mixture, decoys = base_only, {}  # task tag -> the name of the base's operation on it
    for tag, (op, fn) in TAG_OPS.get(variant, {}).items():
        decoys[tag] = f"{op}_{tag}"
        data.GENERAL[decoys[tag]] = Skill(decoys[tag], decoys[tag], tag, ANY_ALPHABET, fn)
        mixture += ((Component(decoys[tag], "short"), TAG_OP_SHARE),)

    def specialist_mixture(skill: str, own_share: float = 0.5):
        # replay never shows what the base did on the specialist's own tag
        own = decoys.get(data.SKILLS[skill].short_tag)
        replay = tuple((c, w * (1.0 - own_share)) for c, w in mixture if c.name != own)
        return ((Component(skill, "short"), own_share),) + replay

    build.BASE_MIXTURE = data.BASE_MIXTURE = mixture
    build.specialist_mixture = specialist_mixture
    sample_text = data.sample_text

    def sample_hidden(rng, component):
        if component.name not in decoys.values():
            return sample_text(rng, component)
        x = data._input(rng, data._any_alphabet(rng), hide=True)
        return data.GENERAL[component.name].short(x)

    if hide:
        data.sample_text = sample_hidden


def _rare_copying(mixture, task_tags: str):
    """``mixture`` (copying on no task tag) with copying on each task tag put back at RARE times
    any other copy tag's rate, the copying's total weight unchanged."""
    from evomerge.zoo import data

    copying = data.Component("cpy", "short", skip=task_tags)
    free = "".join(t for t in data.COPY_TAGS if t not in task_tags)
    per_tag = dict(mixture)[copying] / (len(free) + RARE * len(task_tags))
    out = tuple((c, per_tag * len(free)) if c == copying else (c, w) for c, w in mixture)
    return out + ((data.Component("cpy", "short", skip=free), per_tag * RARE * len(task_tags)),)


def _specialists_in_process(settings, root: Path, progress: bool, threads: int, jobs=None) -> dict[str, list[float]]:
    """build._train_specialists, in this process (where the data patches are)."""
    from evomerge.zoo import build

    for skill in settings.skills:
        build._fine_tune_one(root, settings.seed, settings.preset, skill, progress, 0)
    return {skill: build.take_losses(root, skill) for skill in settings.skills}


SKILL_NAMES = tuple(SKILLS)  # mir, sft, srt: the order of the pairs and switch points printed
SWITCH_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))  # the fractions of a task vector switch_points tries


def _task_vectors(zoo: Path):
    """The zoo's base loaded for scoring, its tokenizer, its weights, each specialist's task vector."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tau = {s: {k: v - base[k] for k, v in load_file(zoo / s / "model.safetensors").items()} for s in SKILL_NAMES}
    return model, tokenizer, base, tau


def _own_score(skill: str):
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.terms import FitnessTerm

    evaluator = Evaluator([FitnessTerm(f"{skill}_test", "acc")])
    return lambda model, tokenizer: evaluator.score_model(model, tokenizer).scores[f"{skill}_test"]["acc"]


def pair_scores(zoo: Path) -> dict[str, tuple[float, float]]:
    """Each pair of specialists summed onto the base: the two own-skill test scores."""
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.terms import FitnessTerm

    model, tokenizer, base, tau = _task_vectors(zoo)
    evaluator = Evaluator([FitnessTerm(f"{s}_test", "acc") for s in SKILL_NAMES])
    out = {}
    for a, b in itertools.combinations(SKILL_NAMES, 2):
        model.load_state_dict({k: base[k] + tau[a][k] + tau[b][k] for k in base})
        got = evaluator.score_model(model, tokenizer).scores
        out[f"{a}+{b}"] = (got[f"{a}_test"]["acc"], got[f"{b}_test"]["acc"])
    return out


def switch_points(zoo: Path) -> dict[str, float]:
    """Per specialist, the least fraction ``a`` of SWITCH_GRID at which base + a * its task vector
    scores >= 0.5 on its own skill (inf: none). The uniform merge gives each a third of its
    vector, so a point near 1/3 lets it pass; a sum of all three (task arithmetic, lambda 1) gives
    each all of it beside the others' vectors, so a point near 1 leaves little room for them. It
    tracks the uniform bar, not collisions (bench/RESULTS.md, nineteenth session)."""
    model, tokenizer, base, tau = _task_vectors(zoo)
    out = {}
    for skill in SKILL_NAMES:
        score, out[skill] = _own_score(skill), float("inf")
        for a in SWITCH_GRID:
            model.load_state_dict({k: base[k] + a * tau[skill][k] for k in base})
            if score(model, tokenizer) >= 0.5:
                out[skill] = a
                break
    return out


def switch_cell(zoo: Path) -> str:
    return " / ".join(f"{a:g}" for a in switch_points(zoo).values())


def _child() -> None:
    """In the pinned child: patch, then build as `evomerge zoo build` does."""
    variant, out, seed, threads, hide = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
    patch_data(variant, hide)
    from evomerge.zoo.build import build_zoo

    build_zoo(out, seed=seed, progress=False, threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[6])
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "zoo_tag_variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hide", action="store_true", help="the base's operations on the task tags never show a held-out input")
    args = ap.parse_args()

    from evomerge.zoo.build import run_pinned
    from zoo_seeds import score_zoo, summary

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
    print("| seed | variant | specialist own (min) | specialist other (max) | uniform | best hand merge | holds "
          "| mir+sft | mir+srt | sft+srt | switch at (mir / sft / srt) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, variant in itertools.product(args.seeds, args.variants):
        zoo = args.root / (variant + "-hide" * (args.hide and variant in TAG_OPS)) / f"seed{seed}"
        child = ["--child", variant, str(zoo), str(seed), str(args.threads), str(int(args.hide))]
        run_pinned("zoo_tag_variants", child, args.threads, False, zoo)
        s = summary(score_zoo(zoo))
        pairs = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in pair_scores(zoo).values())
        print(f"| {seed} | {zoo.parent.name} | {s['own_min']:.3f} | {s['other_max']:.3f} | {s['uniform']:.3f} | {s['best_hand']:.3f} ({s['best_hand_name']}) | "
              f"{'yes' if s['holds'] else 'NO'} | {pairs} | {switch_cell(zoo)} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child()
    else:
        main()
