"""The zoo build's three specialists one after another (the build before: one process, 2
threads) against side by side (the build now: a pinned child each, one thread each).

    python bench/bench_zoo_build.py [--zoo ~/.cache/evomerge/zoo-default] [--threads 2] [--jobs 1 2 3]

Takes the base of a built zoo, fine-tunes its specialists into a scratch directory once per
--jobs setting (1: one after another with --threads threads; N: N at a time, --threads // N
threads each), with the build's own code (evomerge/zoo/build.py, _train_specialists), and
prints the seconds, the ratio to --jobs 1 measured in the same run, and whether every
specialist and checkpoint is the zoo's own, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path.home() / ".cache" / "evomerge" / "zoo-default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()

    from evomerge.zoo.build import _train_specialists, read_manifest, zoo_settings

    manifest = read_manifest(args.zoo)
    if manifest is None:
        raise SystemExit(f"{args.zoo} is no built zoo: run `evomerge zoo build {args.zoo}` first")
    s = manifest["settings"]
    settings = zoo_settings(s["preset"], s["seed"])
    models = list(settings.skills) + [d for ds in manifest["checkpoints"].values() for d in ds]
    print(f"zoo {args.zoo} (preset {s['preset']}, seed {s['seed']}), {args.threads} threads in all")
    first = None
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            shutil.copytree(args.zoo / "base", root / "base")
            started = time.perf_counter()
            _train_specialists(settings, root, progress=False, threads=args.threads, jobs=jobs)
            took = time.perf_counter() - started
            same = all(sha(root / m / "model.safetensors") == sha(args.zoo / m / "model.safetensors") for m in models)
        first = first or took
        each = max(1, args.threads // jobs)
        verdict = "the zoo's own, bit for bit" if same else "DIFFER from the zoo"
        print(f"jobs {jobs} ({each} thread{'s' * (each > 1)} each): {took:6.1f} s, {first / took:.2f}x jobs {args.jobs[0]}'s "
              f"speed; {len(models)} models {verdict}", flush=True)


if __name__ == "__main__":
    main()
