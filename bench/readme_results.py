"""The README's toy-zoo results table, from the commands it names.

    python bench/readme_results.py [--zoo runs/zoo] [--check README.md]

Builds (or finds cached) the default zoo, scores its sources and every hand merge in
docs/hand_merges/ on the test splits, runs the shipped toy searches (each in a fresh run
dir), and prints the markdown table the README shows between its `toy-results` markers.
With --check it compares that table with the README's, cell by cell (the same rows, every
score within 0.02), and exits 1 naming the first cell that disagrees.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
SEARCHES = ("toy_ps", "toy_ps_dfs", "toy_dfs")
TOLERANCE = 0.02  # per cell: what a newcomer's run may differ by (issue: a proof that reproduces)


def search_row(config: Path, zoo: Path, run_dir: Path) -> tuple[list[float], float]:
    """The best recipe's test scores of one shipped search, and its wall time."""
    import yaml

    data = yaml.safe_load(config.read_text())
    data["base_model"] = str(zoo / "base")
    names = {Path(m).name for m in data["models"]}
    data["models"] = [str(zoo / Path(m).name) for m in data["models"]]
    if data.get("dfs", {}).get("sources"):
        data["dfs"]["sources"] = [s if s == "merge" else str(zoo / Path(s).name) for s in data["dfs"]["sources"]]
    assert names == {"mir", "sft", "srt"}, names
    cfg = run_dir.parent / f"{config.stem}.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(run_dir), "--quiet"], check=True)
    took = time.perf_counter() - t
    scores = json.loads((run_dir / "results.json").read_text())["rows"]["best found"]["scores"]
    return [scores[f"{s}_test"]["acc"] for s in ("mir", "sft", "srt")], took


def table(zoo: Path, searches: bool = True) -> tuple[str, dict[str, float]]:
    """(markdown table, wall seconds per search)."""
    from zoo_seeds import score_zoo

    rows = score_zoo(zoo)["rows"]
    lines = ["| model or recipe | mir | sft | srt | mean |", "|---|---|---|---|---|"]

    def line(label: str, vals: list[float]) -> None:
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {statistics.fmean(vals):.3f} |")

    for name, r in rows.items():
        line(f"`{name}`" if name not in ("base", "mir", "sft", "srt") else name, [r[s] for s in ("mir", "sft", "srt")])
    times = {}
    if searches:
        with tempfile.TemporaryDirectory() as tmp:
            for name in SEARCHES:
                vals, times[name] = search_row(REPO / "search_spaces" / f"{name}.yaml", zoo, Path(tmp) / name)
                line(f"`evomerge search search_spaces/{name}.yaml`", vals)
    return "\n".join(lines), times


def readme_block(readme: str, name: str = "toy-results") -> str:
    """The text between a page's ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    try:
        return readme.split(begin, 1)[1].split(end, 1)[0].strip()
    except IndexError:
        raise SystemExit(f"no {begin} ... {end} block") from None


def score_rows(text: str) -> dict[str, list[float]]:
    """Each table row's label (first cell) -> its last four cells, the scores."""
    out = {}
    for row in text.splitlines():
        parts = [p.strip() for p in row.strip().strip("|").split("|")]
        if len(parts) >= 5 and all(re.fullmatch(r"[\d.]+", p) for p in parts[-4:]):
            out[parts[0]] = [float(p) for p in parts[-4:]]
    return out


def compare(expected: str, got: str, tolerance: float = TOLERANCE) -> str | None:
    """None when the tables agree (same rows, every cell within ``tolerance``), else the first difference."""
    a, b = score_rows(expected), score_rows(got)
    if list(a) != list(b):
        return f"rows differ: README has {list(a)}, the commands give {list(b)}"
    for label, want in a.items():
        for column, (x, y) in zip(("mir", "sft", "srt", "mean"), zip(want, b[label])):
            if abs(x - y) > tolerance:
                return f"{label} / {column}: README says {x:.3f}, the command gives {y:.3f}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / "runs" / "zoo")
    ap.add_argument("--check", type=Path, default=None, help="README to compare with; exit 1 on a difference")
    args = ap.parse_args()
    args.zoo = args.zoo.resolve()  # the searches' configs are written elsewhere
    subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(args.zoo), "--quiet"], check=True)
    text, times = table(args.zoo)
    print(text)
    print("search wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if args.check:
        problem = compare(readme_block(args.check.read_text()), text)
        if problem:
            raise SystemExit(f"{args.check} disagrees with its commands: {problem}")
        print(f"{args.check}: every cell within {TOLERANCE}")


if __name__ == "__main__":
    main()
