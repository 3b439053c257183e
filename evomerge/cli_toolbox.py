"""The toolbox verbs of the `evomerge` command (swa, soup, barrier, zoo toolbox): thin, as cli.py."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def _evaluator(args):
    from .fitness.evaluator import Evaluator
    from .fitness.terms import parse_terms

    return Evaluator(parse_terms(args.tasks, metric=args.metric), args.task_path, args.limit, args.batch_size, args.device)


def _check_dtype(dtype: str | None) -> None:
    from .recipe import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def cmd_swa(args) -> int:
    from .averaging.swa import select_checkpoints, uniform_recipe
    from .io.writer import check_out_dir
    from .merge.to_disk import merge_to_disk

    _check_dtype(args.dtype)
    check_out_dir(Path(args.out_dir), args.force)
    chosen = select_checkpoints(args.checkpoints, args.last, args.stride)
    merge_to_disk(uniform_recipe(chosen, args.dtype), args.out_dir, force=args.force, progress=not args.quiet)
    print(f"SWA of {len(chosen)} checkpoints ({chosen[0].name} .. {chosen[-1].name}) written to {args.out_dir}")
    return 0


def cmd_soup(args) -> int:
    from .averaging.soup import Step, greedy_soup, live_scorer, soup_report
    from .averaging.swa import uniform_recipe
    from .io.writer import check_out_dir
    from .merge.to_disk import merge_to_disk

    out = Path(args.out_dir)
    _check_dtype(args.dtype)
    check_out_dir(out, args.force)
    models = [Path(m) for m in args.models]
    if len(models) < 2:
        raise UserError("a soup needs at least 2 models")
    if len(set(models)) != len(models):
        raise UserError("a model is listed twice; list each ingredient once")
    score = live_scorer(models, _evaluator(args), args.device)

    def show(step: Step) -> None:
        if not args.quiet:
            got = "" if step.soup is None else f", soup with it {step.soup:.4f} ({'kept' if step.kept else 'dropped'})"
            print(f"  {step.ingredient}: alone {step.alone:.4f}{got}", flush=True)

    if args.greedy:
        recipe, steps, final = greedy_soup(models, score, args.dtype, show)
    else:
        recipe = uniform_recipe(models, args.dtype)
        final = score(recipe)
        steps = [Step(str(m), None, None, True) for m in models]
    text = soup_report(steps, final, args.greedy)
    log = {"greedy": args.greedy, "tasks": args.tasks, "fitness": final, "steps": [s.__dict__ for s in steps]}
    merge_to_disk(recipe, out, force=args.force, progress=not args.quiet,
                  extra_files={"evomerge_soup.json": json.dumps(log, indent=2) + "\n"})
    print(text)
    print(f"wrote {out}")
    return 0


def cmd_align(args) -> int:
    """B permuted onto A, written as a model: a recipe with align: and B alone, weight 1."""
    from .merge.to_disk import merge_to_disk
    from .recipe import parse_recipe

    data = {"merge_method": "linear", "models": [{"model": args.a, "parameters": {"weight": 0.0}},
                                                  {"model": args.b, "parameters": {"weight": 1.0}}],
            "align": {"method": args.method, "reference": args.a, "rotate": not args.permutations_only},
            "tokenizer_source": args.b}
    if args.method == "activation":
        data["calibration"] = _calibration(args, None).model_dump(exclude_none=True)
    merge_to_disk(parse_recipe(data), args.out_dir, force=args.force, progress=not args.quiet)
    how = "permutations only" if args.permutations_only else "permutations and head rotations"
    print(f"{args.b} aligned onto {args.a} ({args.method} matching, {how}) written to {args.out_dir}")
    return 0


def cmd_zoo_toolbox(args) -> int:
    from .zoo.toolbox import DEFAULT_DIR, build_toolbox

    out = build_toolbox(args.out_dir or DEFAULT_DIR, args.zoo, progress=not args.quiet, threads=args.threads)
    print(f"toolbox family ready in {out}")
    return 0


def add_eval_args(p, required: bool = True) -> None:
    p.add_argument("--tasks", required=required, default=None,
                   help="tasks, task[:metric[:weight]] comma-separated (e.g. mir_search,sft_search:logprob)")
    p.add_argument("--task-path", default=None, help="folder of task YAMLs (default: the shipped evomerge/tasks/)")
    p.add_argument("--limit", type=float, default=None, help="score only the first N documents of each task")
    p.add_argument("--metric", default="acc", help="metric for tasks named without one (default acc)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")


def add_parsers(sub, zsub) -> None:
    z = zsub.add_parser("toolbox", help="soup ingredients, SWA iterates and an independently trained pair, on a built zoo")
    z.add_argument("out_dir", nargs="?", default=None, help="default runs/zoo_toolbox")
    z.add_argument("--zoo", default="runs/zoo", help="the built zoo whose base they fine-tune (default runs/zoo)")
    z.add_argument("--threads", type=int, default=2)
    z.add_argument("--quiet", action="store_true")
    z.set_defaults(func=cmd_zoo_toolbox)

    p = sub.add_parser("swa", help="stochastic weight averaging of checkpoints of one run")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT_DIR", help="checkpoint dirs in training order, or a quoted glob (natural order)")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--last", type=int, default=None, help="average only the last K selected checkpoints")
    p.add_argument("--stride", type=int, default=1, help="take every S-th checkpoint (before --last)")
    p.add_argument("--dtype", default=None, help="output dtype (default: the checkpoints')")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_swa)

    p = sub.add_parser("soup", help="a uniform or greedy model soup of fine-tunes of one base")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--greedy", action="store_true", help="Wortsman et al.'s greedy soup on the held-out --tasks")
    add_eval_args(p)
    p.add_argument("--dtype", default=None, help="output dtype (default: the models')")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_soup)
    add_barrier_parser(sub)
    add_align_parser(sub)


def _calibration(args, fallback_task: str | None):
    """The calibration flags as a recipe's ``calibration:`` section."""
    from .recipe import Calibration

    if args.data and args.calibration_task:
        raise UserError("give --data or --calibration-task, not both")
    task = args.calibration_task or (None if args.data else fallback_task)
    if not args.data and not task:
        raise UserError("name calibration texts: --data FILE.jsonl or --calibration-task TASK (or --tasks, whose first task's documents are used)")
    return Calibration(data=args.data, task=task, task_path=args.task_path, field=args.field,
                       limit=args.calibration_limit, max_length=args.max_length)


def cmd_barrier(args) -> int:
    from .landscape.barrier import plot, scan, table

    first = args.tasks.split(",")[0].split(":")[0] if args.tasks else None
    spec = _calibration(args, first).spec()
    evaluator = _evaluator(args) if args.tasks else None
    out = Path(args.out)

    def show(label, point) -> None:
        if not args.quiet:
            score = "" if point.score is None else f", score {point.score:.4f}"
            print(f"  {label}: t={point.t:.2f} loss {point.loss:.4f}{score}", flush=True)

    paths = scan(args.a, args.b, spec, args.method, tuple(args.align or ()), evaluator, args.points, show)
    text = table(paths)
    from .io.writer import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "barrier.json", json.dumps({"a": args.a, "b": args.b, "method": args.method,
                                                         "paths": [p.to_dict() for p in paths]}, indent=2) + "\n")
    png = plot(paths, out / "barrier.png", f"{Path(args.a).name} to {Path(args.b).name} ({args.method})")
    print(text)
    print(f"wrote {out / 'barrier.json'} and {png}")
    return 0


def add_calibration_args(p) -> None:
    p.add_argument("--data", default=None, help="calibration texts: a JSONL file (one object per line)")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (default text)")
    p.add_argument("--calibration-task", default=None, help="calibration texts: an lm-eval task's documents (prompt + answer)")
    p.add_argument("--calibration-limit", type=int, default=256, help="at most this many texts, a seeded subset (default 256)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")


def add_align_parser(sub) -> None:
    p = sub.add_parser("align", help="permute B's units onto A's (Git Re-Basin): the same function as B, in A's basin")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--method", default="weight", choices=("weight", "activation"))
    p.add_argument("--permutations-only", action="store_true",
                   help="do not rotate the heads' dims after permuting (Git Re-Basin as published)")
    add_calibration_args(p)
    p.add_argument("--task-path", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_align)


def add_barrier_parser(sub) -> None:
    p = sub.add_parser("barrier", help="loss and task score along the path between two models, with the barrier height")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--method", default="linear", help="linear or slerp")
    p.add_argument("--align", action="append", default=None,
                   help="also after aligning B onto A: weight or activation (permutations, then head rotations), "
                        "weight-perm or activation-perm (permutations only); repeatable")
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--out", default="barrier", help="folder for barrier.json and barrier.png (default ./barrier)")
    add_eval_args(p, required=False)
    add_calibration_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_barrier)
