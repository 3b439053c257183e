"""The zoo's specialists fine-tuned another way, on the same bases: does a change hold more seeds?

    python bench/zoo_specialists.py [--seeds 6 8] [--sam-rho 0.1] [--soup 2] [--own-share 0.5]
                                    [--steps 400] [--lr-scale 0.75] [--rates 0.042 0.03 0.021]
                                    [--replay-copy own|consistent] [--copy-scale 0.5]
                                    [--base shipped|unseen] [--search] [--bases runs/zoo_seeds]
                                    [--root runs/zoo_specialists] [--threads 2]

A change to how the specialists fine-tune leaves every seed's base as it was, so this script
takes each seed's base from a built zoo (BASES/seedN, when its settings name the same base;
otherwise it trains it, as `evomerge zoo build` does, and keeps it under ROOT/bases), fine-tunes
the three specialists with the default preset's settings, changed where an option says (the
SAM radius, 0 for plain SGD steps; each specialist the uniform soup of K fine-tunes on K data
streams; its own share of the data; its steps; its rates; the copying in its replay, see
patch_replay), pinned like a build, into ROOT/<variant>/seedN, and prints per seed
zoo_seeds.py's bars and each pair of specialists summed (task arithmetic, lambda 1: the pair's
two own-skill test scores) and where each switches on along its task vector (switch_points in
zoo_tag_variants.py); with --search also the default search's best test mean and whether
it beats every hand merge, the uniform merge and every source (zoo_seeds.py's bar). With the
preset's own settings the specialists are `evomerge zoo build`'s, bit for bit. ~2.5 min per seed
on 2 cores (+2.3 min for a base it trains, +2 min for a search); two runs side by side at
--threads 1 train two seeds in ~3 min.

``--base unseen`` fine-tunes on the bases of zoo_tag_variants.py's ``unseen_base`` variant, which
never saw the tasks' tags (BASES/seedN then being that script's ROOT/unseen_base/seedN; the bases
this script trains for it go under ROOT/bases-unseen)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def settings(seed: int, rho: float | None, own_share: float | None = None, steps: int | None = None,
             lr_scale: float = 1.0, rates: tuple[float, ...] | None = None):
    """The default preset's settings for ``seed``, the specialists' changed where an argument says.
    ``steps`` scales the warm-up alike; ``lr_scale`` multiplies every specialist's rate (``rates``,
    when given, in the order of the skills, else the preset's)."""
    from evomerge.zoo.build import zoo_settings

    s = zoo_settings("default", seed)
    spec = s.specialist if rho is None else replace(s.specialist, sam_rho=rho)
    if steps is not None:
        spec = replace(spec, steps=steps, warmup=round(spec.warmup * steps / spec.steps))
    return replace(s, specialist=spec, own_share=s.own_share if own_share is None else own_share,
                   specialist_lr=tuple(lr * lr_scale for lr in (rates or s.specialist_lr)))


def base_of(zoo: Path, seed: int, base: str = "shipped") -> bool:
    """Whether ``zoo`` holds the base the default preset trains for ``seed`` (``base="unseen"``:
    zoo_tag_variants.py's ``unseen_base`` variant of it)."""
    from evomerge.zoo.build import ZOO_FORMAT, read_manifest

    from evomerge.zoo.train import ModelShape, Schedule

    m, want = read_manifest(zoo) or {}, settings(seed, None)
    got = m.get("settings", {})
    try:  # through the dataclasses: a manifest written before a field was added has its default
        same = (got["seed"], got["preset"], ModelShape(**got["shape"]), Schedule(**got["base"])) == (
            want.seed, want.preset, want.shape, want.base)
    except (KeyError, TypeError):
        return False
    if base == "shipped":
        fmt = ZOO_FORMAT
    else:
        from zoo_tag_variants import variant_format

        fmt = variant_format("unseen_base")
    return same and m.get("format") == fmt and (zoo / "base" / "config.json").is_file()


def patch_replay(copy_on: str, scale: float) -> None:
    """In the child: change the copying in the short format in each specialist's replay.

    ``copy_on="others"`` (the preset's): on every free tag but the specialist's own, over every
    alphabet; ``"own"``: only on its own tag, over the other skills' alphabets (where its own
    operation leaves an input as it is: mirror and shift are the identity there; sorting is
    taken to sort its own alphabet only), so no specialist is trained on another's tag;
    ``"consistent"``: on every tag the base copies on, the three skills' included, over every
    alphabet but that of the skill owning the tag, so no example contradicts any specialist's
    skill (a merge that kept all three would be right on every example each was trained on).
    ``scale`` multiplies that component's weight (0: no copying in the replay)."""
    from evomerge.zoo import build, data

    if (copy_on, scale) == ("others", 1.0):
        return
    mixture = build.specialist_mixture

    def patched(skill: str, share: float):
        out = []
        for c, w in mixture(skill, share):
            if (c.name, c.fmt) == ("cpy", "short"):
                c, w = {"others": c, "own": c._replace(name=f"idle_{skill}"),
                        "consistent": c._replace(name="cpy_consistent")}[copy_on], w * scale
            if w > 0:
                out.append((c, w))
        return tuple(out)

    sample_text = data.sample_text

    def sample(rng, component):
        if component.name == "cpy_consistent":
            tag = data.COPY_TAGS[int(rng.integers(len(data.COPY_TAGS)))]
            owner = data.SKILLS.get(data.SKILL_TAGS.get(tag, ""))
            alphabets = [k.alphabet for k in data.SKILLS.values() if k is not owner]
            x = data._input(rng, alphabets[int(rng.integers(len(alphabets)))], hide=owner is not None)
            return f"{tag}:{x}>{x}"
        if not component.name.startswith("idle_"):
            return sample_text(rng, component)
        own = data.SKILLS[component.name.removeprefix("idle_")]
        others = [k.alphabet for k in data.SKILLS.values() if k is not own]
        x = data._input(rng, others[int(rng.integers(len(others)))], hide=True)
        return f"{own.short_tag}:{x}>{x}"

    build.specialist_mixture, data.sample_text = patched, sample


def _child(out: Path, seed: int, bases: Path, threads: int, opts: dict) -> None:
    """In the pinned child: the base (found or trained), then the three specialists (each the
    uniform soup of ``soup`` fine-tunes on data streams 0..soup-1; stream 0 is the build's)."""
    import torch
    from transformers import LlamaForCausalLM

    from evomerge.zoo import build
    from evomerge.zoo.build import check_mkl_branch, quiet_transformers, train_base, train_specialist
    from evomerge.zoo.tokenizer import build_tokenizer

    check_mkl_branch()
    torch.set_num_threads(threads)
    soup, base_kind = opts.pop("soup"), opts.pop("base")
    patch_replay(opts.pop("replay_copy"), opts.pop("copy_scale"))
    if base_kind == "unseen":  # the base's data only; the specialists' replay stays the preset's
        from zoo_tag_variants import patch_data

        patch_data("unseen_base", hide=False)
    s, tokenizer = settings(seed, **opts), build_tokenizer()

    def save(model, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with quiet_transformers():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)

    # ROOT/bases (ROOT/bases-unseen): the bases this script trained, for every variant
    own = out.parent.parent / ("bases" + "-unseen" * (base_kind == "unseen")) / f"seed{seed}"
    base_dir = bases / f"seed{seed}" / "base" if base_of(bases / f"seed{seed}", seed, base_kind) else own
    if not (base_dir / "config.json").is_file():
        base_dir.parent.mkdir(parents=True, exist_ok=True)
        save(train_base(s, tokenizer, progress=False)[0], base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    for skill in s.skills:
        if not (out / skill / "config.json").is_file():
            models = [train_specialist(s, base, skill, tokenizer, progress=False, stream=k)[0] for k in range(soup)]
            if soup > 1:
                params = [dict(m.named_parameters()) for m in models]
                with torch.no_grad():
                    for name, p in params[0].items():
                        p.copy_(torch.stack([q[name] for q in params]).mean(0))
            save(models[0], out / skill)
    if not (out / "base").exists():
        os.symlink(base_dir.resolve(), out / "base")
    manifest = {"models": {"base": "base", **{k: k for k in s.skills}}, "settings": asdict(s), "base_dir": str(base_dir)}
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--sam-rho", type=float, default=None, help="the specialists' SAM radius (default: the preset's)")
    ap.add_argument("--bases", type=Path, default=REPO / "runs" / "zoo_seeds", help="built zoos (BASES/seedN) whose bases to reuse")
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "zoo_specialists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search", action="store_true", help="also run the default search on each seed's family")
    ap.add_argument("--soup", type=int, default=1, help="each specialist the uniform soup of this many fine-tunes "
                    "on different data streams (1: the build's own)")
    ap.add_argument("--own-share", type=float, default=None, help="share of each specialist's own skill in its data (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="specialist steps, warm-up scaled alike (default: the preset's)")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every specialist's learning rate")
    ap.add_argument("--rates", type=float, nargs=3, default=None, metavar=("MIR", "SFT", "SRT"),
                    help="the specialists' learning rates (default: the preset's, 0.042 0.03 0.021)")
    ap.add_argument("--replay-copy", choices=["others", "own", "consistent"], default="others",
                    help="copying in the short format in each specialist's replay: on every tag but its own (the "
                    "preset's); on its own tag over the other skills' alphabets; or on every copy tag over every "
                    "alphabet but that of the tag's skill (patch_replay)")
    ap.add_argument("--copy-scale", type=float, default=1.0, help="scales the weight of that copying (0: none)")
    ap.add_argument("--base", choices=["shipped", "unseen"], default="shipped",
                    help="the bases: the preset's, or ones that never saw the tasks' tags (zoo_tag_variants.py's unseen_base)")
    args = ap.parse_args()

    import time

    from evomerge.zoo.build import run_pinned
    from zoo_seeds import score_zoo, search_beats, search_mean, summary
    from zoo_tag_variants import pair_scores, switch_cell

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
    rates = tuple(args.rates) if args.rates else None
    s0 = settings(0, args.sam_rho, args.own_share, args.steps, args.lr_scale, rates)
    rho, default = s0.specialist.sam_rho, settings(0, None)
    variant = (f"rho{rho:g}" + (f"-soup{args.soup}" if args.soup > 1 else "")
               + (f"-own{s0.own_share:g}" if s0.own_share != default.own_share else "")
               + (f"-steps{s0.specialist.steps}" if s0.specialist.steps != default.specialist.steps else "")
               + (f"-lr{args.lr_scale:g}x" if args.lr_scale != 1.0 else "")
               + ("-rates" + "_".join(f"{r:g}" for r in rates) if rates else "")
               + {"others": "", "own": "-owncopy", "consistent": "-consistent"}[args.replay_copy]
               + (f"-copy{args.copy_scale:g}x" if args.copy_scale != 1.0 else "")
               + ("-baseunseen" if args.base == "unseen" else ""))
    opts = {"rho": rho, "own_share": s0.own_share, "steps": s0.specialist.steps, "lr_scale": args.lr_scale, "rates": rates,
            "soup": args.soup, "replay_copy": args.replay_copy,
            "copy_scale": args.copy_scale, "base": args.base}
    print(f"variant {variant}")
    print("| seed | SAM rho | specialist own (min) | specialist other (max) | uniform | best hand merge | holds "
          "| mir+sft | mir+srt | sft+srt | switch at (mir / sft / srt) |" + " search | beats |" * args.search + " trained in |")
    print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * args.search + "---|")
    held = beaten = 0
    for seed in args.seeds:
        out = args.root / variant / f"seed{seed}"
        started = time.perf_counter()
        run_pinned("zoo_specialists", ["--child", str(out), str(seed), str(args.bases), str(args.threads), json.dumps(opts)],
                   args.threads, False, out)
        took = time.perf_counter() - started
        s = summary(score_zoo(out))
        held += s["holds"]
        pairs = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in pair_scores(out).values())
        found = ""
        if args.search:
            s["search"] = search_mean(out)
            beaten += search_beats(s)
            found = f" {s['search']:.3f} | {'yes' if search_beats(s) else 'NO'} |"
        print(f"| {seed} | {rho:g} | {s['own_min']:.3f} | {s['other_max']:.3f} | {s['uniform']:.3f} | "
              f"{s['best_hand']:.3f} ({s['best_hand_name']}) | {'yes' if s['holds'] else 'NO'} | {pairs} | {switch_cell(out)} |{found} {took:.0f} s |",
              flush=True)
    print(f"seeds holding every bar: {held} of {len(args.seeds)}")
    if args.search:
        print(f"seeds where the search beats every hand merge, the uniform merge and every source, at >= 0.95: "
              f"{beaten} of {len(args.seeds)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        out, seed, bases, threads, opts = sys.argv[2:7]
        _child(Path(out), int(seed), Path(bases), int(threads), json.loads(opts))
    else:
        main()
