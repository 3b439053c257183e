"""Every merging method of the toolbox on the zoo's test splits, each row from a command.

    python bench/toolbox_table.py [--zoo runs/zoo] [--toolbox runs/zoo_toolbox] [--plot docs/toolbox/barrier.png]

Builds (or finds cached) the default zoo and its toolbox family (`evomerge zoo toolbox`),
then scores on the test splits (exact match per skill):
- the specialists and the merges of them in docs/toolbox/ (uniform, TIES, DARE-TIES,
  Fisher, RegMean);
- SWA over the constant-rate mir run's iterates against its final iterate, and uniform and
  greedy soups of the four mir fine-tunes (greedy on the mir search split);
- the independently trained pair: each model, their plain average, the average after
  Re-Basin weight and activation matching, ZipIt!;
and the loss barrier between the pair, before and after alignment (printed and plotted).
Calibration data is always the search splits' documents; the test splits stay unseen.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "docs" / "toolbox"
SKILLS = ("mir", "sft", "srt")


def recipe(name: str, zoo: Path, toolbox: Path) -> dict:
    import yaml

    text = (RECIPES / f"{name}.yaml").read_text()
    return yaml.safe_load(text.replace("../../runs/zoo_toolbox", str(toolbox)).replace("../../runs/zoo", str(zoo)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="runs/zoo")
    ap.add_argument("--toolbox", default="runs/zoo_toolbox")
    ap.add_argument("--plot", default=str(RECIPES / "barrier.png"))
    ap.add_argument("--points", type=int, default=11)
    args = ap.parse_args()

    import logging

    from evomerge.fitness.env import set_offline_env, set_quiet_env

    set_offline_env()
    set_quiet_env()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from evomerge.averaging.soup import greedy_soup, live_scorer
    from evomerge.averaging.swa import select_checkpoints, uniform_recipe
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.terms import FitnessTerm
    from evomerge.landscape.barrier import plot, scan, table
    from evomerge.merge.to_disk import merge_to_disk
    from evomerge.recipe import parse_recipe
    from evomerge.stats.calibration import CalibrationSpec
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.toolbox import PRESETS, build_toolbox, swa_dir

    started = time.perf_counter()
    zoo = build_zoo(args.zoo, progress=False)
    toolbox = build_toolbox(args.toolbox, zoo, progress=False)
    test = Evaluator([FitnessTerm(f"{s}_test", "acc") for s in SKILLS])
    rows: list[tuple[str, str, list[float], str]] = []  # group, label, scores, command

    def add(group: str, label: str, model_dir: Path, command: str) -> None:
        got = test.score_dir(model_dir).scores
        rows.append((group, label, [got[f"{s}_test"]["acc"] for s in SKILLS], command))
        print(f"  {group} / {label}: " + " ".join(f"{v:.3f}" for v in rows[-1][2]), file=sys.stderr, flush=True)

    settings = PRESETS["default"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def merged(name: str) -> Path:
            merge_to_disk(parse_recipe(recipe(name, zoo, toolbox)), tmp / name, progress=False)
            return tmp / name

        def merge_cmd(name: str) -> str:
            return f"`evomerge merge docs/toolbox/{name}.yaml OUT`"

        g = "specialists"
        for s in ("base", *SKILLS):
            add(g, s, zoo / s, f"`evomerge eval runs/zoo/{s}`")
        for name, label in (("uniform", "uniform (linear)"), ("ties", "TIES d 0.5"), ("dare_ties", "DARE-TIES d 0.5"),
                            ("fisher", "Fisher"), ("regmean", "RegMean α 0.9"),
                            ("fisher_shared", "Fisher, one calibration set for all"),
                            ("regmean_shared", "RegMean α 0.9, one calibration set for all")):
            add(g, label, merged(name), merge_cmd(name))

        g = "mir fine-tunes"
        iterates = select_checkpoints([str(toolbox / "swa" / "step*")])
        add(g, f"final iterate ({iterates[-1].name})", iterates[-1], f"`evomerge eval runs/zoo_toolbox/{swa_dir(settings.swa.steps)}`")
        merge_to_disk(uniform_recipe(iterates), tmp / "swa", progress=False)
        add(g, f"SWA of {len(iterates)} iterates", tmp / "swa", "`evomerge swa 'runs/zoo_toolbox/swa/step*' OUT`")
        ingredients = [zoo / "mir", *(toolbox / "soup" / i.name for i in settings.ingredients)]
        for m in ingredients[1:]:
            add(g, f"ingredient {m.name}", m, f"`evomerge eval runs/zoo_toolbox/soup/{m.name}`")
        add(g, "uniform soup of 4", merged("mir_uniform_soup"), merge_cmd("mir_uniform_soup"))
        held_out = Evaluator([FitnessTerm("mir_search", "acc")])
        soup, steps, _ = greedy_soup(ingredients, live_scorer(ingredients, held_out))
        merge_to_disk(soup, tmp / "greedy", progress=False)
        kept = sum(s.kept for s in steps)
        add(g, f"greedy soup (kept {kept} of 4)", tmp / "greedy",
            "`evomerge soup runs/zoo/mir runs/zoo_toolbox/soup/* OUT --greedy --tasks mir_search`")

        g = "independent pair"
        for n in "ab":
            add(g, f"pair {n}", toolbox / "pair" / n, f"`evomerge eval runs/zoo_toolbox/pair/{n}`")
        for name, label in (("pair_average", "average"),
                            ("pair_weight_permutations", "Re-Basin weight matching (permutations) + average"),
                            ("pair_activation_permutations", "Re-Basin activation matching (permutations) + average"),
                            ("pair_weight_matching", "weight matching + rotations, + average"),
                            ("pair_activation_matching", "activation matching + rotations, + average"),
                            ("pair_zipit", "ZipIt! (ratio 1)")):
            add(g, label, merged(name), merge_cmd(name))

    print("| group | model or merge | mir | sft | srt | mean | command |")
    print("|---|---|---|---|---|---|---|")
    for group, label, vals, command in rows:
        print(f"| {group} | {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {statistics.fmean(vals):.3f} | {command} |")

    calibration = CalibrationSpec(task="zoo_search", limit=256)
    paths = scan(str(toolbox / "pair" / "a"), str(toolbox / "pair" / "b"), calibration, "linear",
                 ("weight-perm", "activation-perm", "weight", "activation"), test, args.points)
    print()
    print("Loss barrier between pair/a and pair/b (mean NLL per token on the search splits; score = mean test exact match);")
    print("`evomerge barrier runs/zoo_toolbox/pair/a runs/zoo_toolbox/pair/b --align weight-perm --align activation-perm "
          "--align weight --align activation "
          "--tasks mir_test,sft_test,srt_test --calibration-task zoo_search`:")
    print()
    print(table(paths))
    plot(paths, Path(args.plot), "zoo pair/a to pair/b (linear path)")
    print(f"\n(plot: {args.plot}; {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
