"""Time and memory of the data-dependent statistics: RegMean Grams and diagonal Fishers.

    python bench/bench_stats.py [--model runs/zoo/mir] [--smollm2] [--examples 512] [--threads 1]

Each statistic is computed twice in a child process of its own (so peak RSS is that one
computation's), into a fresh cache: the first call computes, the second must read the cache.
Calibration: the zoo's search-split documents (``zoo_search``, 600), a seeded subset.
Prints seconds for both calls, the ratio, peak RSS, and for the Grams the size of the largest
layer's statistics against the whole file (the streamed computation holds one layer's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from evomerge.stats.cache import fisher_stats, gram_stats
from evomerge.stats.calibration import CalibrationSpec
model, kind, n, threads, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
spec = CalibrationSpec(task="zoo_search", limit=n)
fn = gram_stats if kind == "gram" else fisher_stats
times = []
for _ in range(2):
    t = time.perf_counter()
    path = fn(model, spec, cache_dir=cache, threads=threads)
    times.append(time.perf_counter() - t)
print(json.dumps({"first_s": times[0], "second_s": times[1], "path": str(path),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def layer_share(path: str) -> tuple[float, float]:
    """(largest layer's Gram bytes, all Grams' bytes), in MB."""
    import re

    from evomerge.io.safetensors_file import read_header

    entries, _ = read_header(Path(path))
    per_layer: dict[str, int] = {}
    for name, e in entries.items():
        m = re.search(r"\.(\d+)\.", name)
        per_layer[m.group(1) if m else name] = per_layer.get(m.group(1) if m else name, 0) + e.nbytes
    return max(per_layer.values()) / 1e6, sum(per_layer.values()) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/zoo/mir")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (evomerge zoo smollm2's base)")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model = args.model
    if args.smollm2:
        from evomerge.zoo.smollm2 import ensure_smollm2

        model = str(ensure_smollm2())
    print(f"model {model}, {args.examples} examples of zoo_search, {args.threads} thread(s)")
    print("| statistic | first call s | second call (cache) s | ratio | peak RSS GB | largest layer MB / file MB |")
    print("|---|---|---|---|---|---|")
    for kind in ("gram", "fisher"):
        with tempfile.TemporaryDirectory() as cache:
            done = subprocess.run([sys.executable, "-c", CHILD, model, kind, str(args.examples), str(args.threads), cache],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            share = "-"
            if kind == "gram":
                big, total = layer_share(r["path"])
                share = f"{big:.1f} / {total:.1f}"
        print(f"| {kind} | {r['first_s']:.1f} | {r['second_s']:.2f} | {r['first_s'] / r['second_s']:.0f}x | "
              f"{r['peak_rss_gb']:.2f} | {share} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
