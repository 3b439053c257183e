"""The `evomerge` command: parse, validate, call one library function per verb.

Errors a user can cause (UserError) print one line and exit with code 2; a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# No network at run time: set before anything imports datasets, lm_eval or huggingface_hub.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .errors import UserError  # noqa: E402


def cmd_merge(args) -> int:
    from .merge.to_disk import merge_to_disk
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    merge_to_disk(recipe, args.out_dir, recipe_dir=Path(args.recipe).resolve().parent, device=args.device,
                  seed=args.seed, force=args.force, dry_run=args.dry_run, progress=not args.quiet)
    if not args.dry_run:
        print(f"wrote {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary search for model-merge recipes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("merge", help="turn a recipe YAML (evomerge or mergekit) into a Hugging Face checkpoint")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("out_dir", help="output model directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=None, help="seed for random kernels (DARE); default: the recipe's")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--dry-run", action="store_true", help="print the plan (sources, tensors, bytes, peak memory) and write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
