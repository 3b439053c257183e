"""The zoo's specialists fine-tuned another way, on the same bases: does a change hold more seeds?

    python bench/zoo_specialists.py [--seeds 6 8] [--sam-rho 0.1] [--soup 2] [--search]
                                    [--bases runs/zoo_seeds] [--root runs/zoo_specialists] [--threads 2]

A change to how the specialists fine-tune leaves every seed's base as it was, so this script
takes each seed's base from a built zoo (BASES/seedN, when its settings name the same base;
otherwise it trains it, as `evomerge zoo build` does, and keeps it under ROOT/bases), fine-tunes
the three specialists with the default preset's settings, optionally with sharpness-aware steps
of another radius `--sam-rho` (train.sam_gradient; 0: plain SGD steps) or each as the uniform
soup of `--soup K` fine-tunes on K data streams, pinned like a build, and prints per seed
zoo_seeds.py's bars and each pair of specialists summed (task arithmetic, lambda 1: the pair's
two own-skill test scores); with --search also the default search's best test mean and whether
it beats every hand merge, the uniform merge and every source (zoo_seeds.py's bar). With the
preset's own settings the specialists are `evomerge zoo build`'s, bit for bit. ~2.5 min per seed
on 2 cores (+2.3 min for a base it trains, +2 min for a search)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def settings(seed: int, rho: float | None):
    from evomerge.zoo.build import zoo_settings

    s = zoo_settings("default", seed)
    return s if rho is None else replace(s, specialist=replace(s.specialist, sam_rho=rho))


def base_of(zoo: Path, seed: int) -> bool:
    """Whether ``zoo`` holds the base the default preset trains for ``seed``."""
    from evomerge.zoo.build import ZOO_FORMAT, read_manifest

    from evomerge.zoo.train import ModelShape, Schedule

    m, want = read_manifest(zoo) or {}, settings(seed, None)
    got = m.get("settings", {})
    try:  # through the dataclasses: a manifest written before a field was added has its default
        same = (got["seed"], got["preset"], ModelShape(**got["shape"]), Schedule(**got["base"])) == (
            want.seed, want.preset, want.shape, want.base)
    except (KeyError, TypeError):
        return False
    return same and m.get("format") == ZOO_FORMAT and (zoo / "base" / "config.json").is_file()


def _child(out: Path, seed: int, rho: float, bases: Path, threads: int, soup: int) -> None:
    """In the pinned child: the base (found or trained), then the three specialists (each the
    uniform soup of ``soup`` fine-tunes on data streams 0..soup-1; stream 0 is the build's)."""
    import torch
    from transformers import LlamaForCausalLM

    from evomerge.zoo.build import check_mkl_branch, quiet_transformers, train_base, train_specialist
    from evomerge.zoo.tokenizer import build_tokenizer

    check_mkl_branch()
    torch.set_num_threads(threads)
    s, tokenizer = settings(seed, rho), build_tokenizer()

    def save(model, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with quiet_transformers():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)

    own = out.parent.parent / "bases" / f"seed{seed}"  # ROOT/bases: the bases this script trained, for every radius
    base_dir = bases / f"seed{seed}" / "base" if base_of(bases / f"seed{seed}", seed) else own
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
    args = ap.parse_args()

    import time

    from evomerge.zoo.build import run_pinned
    from zoo_seeds import score_zoo, search_beats, search_mean, summary
    from zoo_tag_variants import pair_scores

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
    rho = settings(0, args.sam_rho).specialist.sam_rho
    print("| seed | SAM rho | specialist own (min) | specialist other (max) | uniform | best hand merge | holds "
          "| mir+sft | mir+srt | sft+srt |" + " search | beats |" * args.search + " trained in |")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * args.search + "---|")
    held = beaten = 0
    for seed in args.seeds:
        out = args.root / (f"rho{rho:g}" + (f"-soup{args.soup}" if args.soup > 1 else "")) / f"seed{seed}"
        started = time.perf_counter()
        run_pinned("zoo_specialists", ["--child", str(out), str(seed), str(rho), str(args.bases), str(args.threads), str(args.soup)],
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
              f"{s['best_hand']:.3f} ({s['best_hand_name']}) | {'yes' if s['holds'] else 'NO'} | {pairs} |{found} {took:.0f} s |",
              flush=True)
    print(f"seeds holding every bar: {held} of {len(args.seeds)}")
    if args.search:
        print(f"seeds where the search beats every hand merge, the uniform merge and every source, at >= 0.95: "
              f"{beaten} of {len(args.seeds)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        out, seed, rho, bases, threads, soup = sys.argv[2:8]
        _child(Path(out), int(seed), float(rho), Path(bases), int(threads), int(soup))
    else:
        main()
