"""Every merge method at its default settings on the toy zoo: the docs' method table.

    python bench/methods_table.py [--zoo runs/zoo] [--check docs/methods.md]

Builds (or finds cached) the default zoo, merges its specialists with each per-tensor method
of the registry (evomerge/merge/kernels.py) at the method's defaults, and prints one row per
method: its parameters (defaults; * = tunable by a search), its reference, the settings the
recipe had to give (a required weight is 1 for every model, slerp's t 0.5, nearswap's t
0.001), and the test-split exact match per skill. Methods of two models take mir and sft;
of one, mir. fisher, regmean and zipit need data or both models whole: see
`python bench/toolbox_table.py`. With --check, the table between the docs' markers must
match this output (every score within 0.02).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SKILLS = ("mir", "sft", "srt")
SKIP = ("fisher", "regmean", "zipit")  # data or whole models: bench/toolbox_table.py
PAIRS = {"slerp": 2, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}  # how many specialists a method takes
REQUIRED = {"weight": 1.0, "t": 0.5}
OVERRIDE = {"nearswap": {"t": 0.001}}  # t is a distance in weight units there


def default_recipe(name: str, zoo: Path) -> tuple[dict, str]:
    """(recipe, the settings it gives) for ``name`` at its defaults."""
    from evomerge.merge.kernels import get_kernel

    kernel = get_kernel(name)
    models = SKILLS[: PAIRS.get(name, len(SKILLS))]
    required = {p.name: REQUIRED[p.name] for p in kernel.params if p.default is None}
    required |= OVERRIDE.get(name, {})
    per_model = {k: v for k, v in required.items() if next(p for p in kernel.params if p.name == k).per_model}
    global_ = {k: v for k, v in required.items() if k not in per_model}
    recipe = {"merge_method": name, "models": [{"model": str(zoo / m), **({"parameters": per_model} if per_model else {})}
                                               for m in models], "dtype": "float32"}
    if name == "slerp":  # slerp runs from its base_model (t = 0) to the other model
        recipe["base_model"] = str(zoo / models[0])
    elif kernel.takes_base:
        recipe["base_model"] = str(zoo / "base")
    if global_:
        recipe["parameters"] = global_
    said = ", ".join(f"{k} {v:g}" for k, v in required.items())
    return recipe, f"{'+'.join(models)}" + (f"; {said}" if said else "")


def params_cell(name: str) -> str:
    from evomerge.merge.kernels import get_kernel

    cells = []
    for p in get_kernel(name).params:
        if p.name == "int8_mask":
            continue
        default = "required" if p.default is None else (str(p.default).lower() if isinstance(p.default, bool) else f"{p.default:g}"
                                                          if isinstance(p.default, float) else str(p.default))
        cells.append(f"{p.name}{'*' if p.tunable else ''} ({default})")
    return ", ".join(cells) or "none"


def table(zoo: Path) -> str:
    import logging

    from evomerge.fitness.env import set_offline_env, set_quiet_env

    set_offline_env()
    set_quiet_env()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.fitness.terms import FitnessTerm
    from evomerge.merge.kernels import KERNELS, REFERENCES
    from evomerge.merge.to_disk import merge_to_disk
    from evomerge.recipe import parse_recipe

    evaluator = Evaluator([FitnessTerm(f"{s}_test", "acc") for s in SKILLS])
    lines = ["| method | parameters (default; * tunable) | reference | recipe | mir | sft | srt | mean |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in KERNELS:
            if name in SKIP or name == "passthrough":
                continue
            recipe, said = default_recipe(name, zoo)
            merge_to_disk(parse_recipe(recipe), Path(tmp) / name, progress=False)
            got = evaluator.score_dir(Path(tmp) / name).scores
            vals = [got[f"{s}_test"]["acc"] for s in SKILLS]
            lines.append(f"| `{name}` | {params_cell(name)} | {REFERENCES[name]} | {said} | "
                         + " | ".join(f"{v:.3f}" for v in vals) + f" | {statistics.fmean(vals):.3f} |")
    return "\n".join(lines)


def main() -> None:
    from readme_results import compare, readme_block

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / "runs" / "zoo")
    ap.add_argument("--check", type=Path, default=None, help="docs page to compare with; exit 1 on a difference")
    args = ap.parse_args()
    args.zoo = args.zoo.resolve()
    subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(args.zoo), "--quiet"], check=True)
    text = table(args.zoo)
    print(text)
    if args.check:
        problem = compare(readme_block(args.check.read_text(), "methods"), text)
        if problem:
            raise SystemExit(f"{args.check} disagrees with its command: {problem}")
        print(f"{args.check}: every score within 0.02")


if __name__ == "__main__":
    main()
