"""`evomerge report`: what a run did, as tables, figures and one self-contained report.html.

It reads only the run directory (and the sources' config headers, to decode the best recipe),
so it runs beside a live search: the history is read without repairing a torn last line,
which is the writer's to finish.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import time
from pathlib import Path

from ..errors import UserError
from ..io.writer import atomic_write_text
from .export import best_of
from .rundir import RunDir


def generation_table(history: list[dict]) -> list[str]:
    gens: dict[int, list[dict]] = {}
    for e in history:
        gens.setdefault(e["generation"], []).append(e)
    lines = ["| generation | scored | failed | cached | raced off | best | mean | best so far |", "|---|---|---|---|---|---|---|---|"]
    best_so_far = float("-inf")
    for g in sorted(gens):
        fits = [e["fitness"] for e in gens[g] if e.get("fitness") is not None]
        failed = sum(1 for e in gens[g] if e.get("error"))
        cached = sum(1 for e in gens[g] if e.get("cached"))
        stopped = sum(1 for e in gens[g] if e.get("stage") == "first")  # racing: first stage only
        full = [e["fitness"] for e in gens[g] if e.get("fitness") is not None and e.get("stage") != "first"]
        if full:
            best_so_far = max(best_so_far, max(full))
        row = (f"| {g} | {len(fits)} | {failed} | {cached} | {stopped} | {max(fits):.4f} | {sum(fits) / len(fits):.4f} | {best_so_far:.4f} |"
               if fits else f"| {g} | 0 | {failed} | {cached} | {stopped} | - | - | {best_so_far:.4f} |")
        lines.append(row)
    return lines


def run_facts(rd: RunDir, cfg, history: list[dict], results: dict | None) -> dict[str, str]:
    """The numbers a person asks first: how far, how long, how well the workers were used."""
    log = rd.log_file.read_text(encoding="utf-8").splitlines() if rd.log_file.is_file() else []
    stamps = [_stamp(line) for line in log]
    stamps = [s for s in stamps if s is not None]
    facts = {
        "optimizer": f"{cfg.optimizer.backend}, popsize {cfg.optimizer.popsize}, seed {cfg.optimizer.seed}",
        "evaluations": f"{len(history)} of {cfg.optimizer.max_evals}",
        "generations": str(len({e['generation'] for e in history})),
        "failed": str(sum(1 for e in history if e.get("error"))),
        "raced off": str(sum(1 for e in history if e.get("stage") == "first")),
        "cached (same recipe)": str(sum(1 for e in history if e.get("cached"))),
        "resumes": str(sum(1 for line in log if line.endswith(" resumed"))),
        "worker time": f"{sum(e.get('wall_s') or 0.0 for e in history):.1f} s "
                       f"({sum(e.get('merge_s') or 0.0 for e in history):.1f} s materializing)",
    }
    if len(stamps) >= 2:
        facts["wall time (log)"] = f"{(stamps[-1] - stamps[0]).total_seconds():.0f} s, {stamps[0]:%Y-%m-%d %H:%M} to {stamps[-1]:%H:%M}"
    if results and results.get("utilization") is not None:
        facts["worker utilization"] = f"{results['utilization']:.1%}"
    best = best_of(history, rd.read_confirmed())
    if best is not None:
        facts["best"] = f"fitness {best['fitness']:.4f} at eval {best['eval_id']} (generation {best['generation']})"
    return facts


def _stamp(line: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None


def _results(rd: RunDir) -> dict | None:
    path = rd.path / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def comparison_rows(cfg, results: dict | None) -> tuple[list[str], list[list[str]]]:
    """The end-of-search table: each source, the uniform merge and the best found, on the
    search terms (when the run scored them) and the test terms."""
    if not results:
        return [], []
    test = [(t.task, t.metric) for t in cfg.test]
    search = [(t.task, t.metric) for t in cfg.fitness.tasks] if results.get("search_rows") else []
    head = ["model"] + [f"{t} {m}" for t, m in search] + (["search mean"] if search else []) + \
           [f"{t} {m}" for t, m in test] + ["test mean"]
    rows = []
    for name, r in results["rows"].items():
        cells = [name]
        if search:
            cells += _cells((results["search_rows"] or {}).get(name, {}), search)
        cells += _cells(r, test)
        rows.append(cells)
    return head, rows


def _cells(r: dict, cols: list[tuple[str, str]]) -> list[str]:
    if "error" in r or "scores" not in r:
        return ["error"] * (len(cols) + 1)
    vals = [r["scores"][t][m] for t, m in cols]
    return [f"{v:.3f}" for v in vals] + [f"{sum(vals) / len(vals):.3f}"]


def summarize(run_dir: str, plot: bool = True) -> str:
    """The text `evomerge report` prints; with ``plot``, also writes RUN_DIR/report/."""
    rd = RunDir(run_dir)
    cfg = rd.load_config()
    history = rd.read_history(repair=False)
    if not history:
        raise UserError(f"{rd.path} has no evaluated candidates yet")
    lines = [f"run {rd.path} — {cfg.optimizer.backend}, popsize {cfg.optimizer.popsize}, {len(history)} candidates",
             *generation_table(history)]
    results = _results(rd)
    facts = run_facts(rd, cfg, history, results)
    lines.append("")
    lines += [f"{k}: {v}" for k, v in facts.items()]
    head, rows = comparison_rows(cfg, results)
    if rows:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    if plot:
        out = write_report(rd, cfg, history, facts, (head, rows))
        lines.append(f"\nreport: {out / 'report.html'}")
    return "\n".join(lines)


def figures(rd: RunDir, cfg, history: list[dict]) -> dict[str, object]:
    """name -> Figure, for what this run has: always fitness; the terms when there are
    several; the best recipe's per-layer parameters (PS) and routed path (DFS); the front."""
    from . import plots

    figs = {"fitness": plots.fitness_figure(history)}
    terms = [(t.task, t.metric) for t in cfg.fitness.tasks]
    if terms and plots.best_so_far(history):
        figs["terms"] = plots.terms_figure(history, terms)
    best = best_of(history, rd.read_confirmed())
    if best is not None:
        from .search import build_space

        space = build_space(cfg)
        names = {m: _short(m) for m in cfg.model_refs()}
        if cfg.ps is not None and plots.recipe_arrays(space, best["genome"]):
            figs["recipe"] = plots.heatmap_figure(space, best["genome"], _layers(cfg), [names[m] for m in space.members])
        if cfg.dfs is not None:
            recipe = space.decode(best["genome"])
            counts: dict[str, int] = {}
            for src, layer in space.slots:
                counts[_short(src)] = max(counts.get(_short(src), 0), layer + 1)
            slots = [{"source": _short(s.source), "layer": s.layer, "scale": s.scale} for s in recipe.routing.slots]
            figs["route"] = plots.route_figure(slots, counts, list(counts))
    if rd.front.is_file():
        front = [e for e in history if e["eval_id"] in {f["eval_id"] for f in json.loads(rd.front.read_text())}]
        figs["front"] = plots.front_figure(history, front, cfg)
    return figs


def _short(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1]


def _layers(cfg) -> int:
    from ..io.model_dir import open_model

    return open_model(cfg.base_model or cfg.models[0]).arch.num_layers


def write_report(rd: RunDir, cfg, history: list[dict], facts: dict[str, str], table) -> Path:
    """RUN_DIR/report/: one PNG per figure and report.html with them inlined (one file to send)."""
    import matplotlib.pyplot as plt

    out = rd.path / "report"
    out.mkdir(exist_ok=True)
    pngs = {}
    for name, fig in figures(rd, cfg, history).items():
        path = out / f"{name}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        tmp.replace(path)
        pngs[name] = path
    atomic_write_text(out / "report.html", render_html(rd, cfg, history, facts, table, pngs))
    return out


def render_html(rd: RunDir, cfg, history, facts, table, pngs: dict[str, Path]) -> str:
    head, rows = table
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>evomerge report: {esc(rd.path.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
             f"<h1>{esc(rd.path.name)}</h1><p>{esc(str(rd.path))}; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<h2>Run</h2><table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts.items()) + "</table>"]
    if rows:
        parts.append("<h2>Sources, uniform merge, best found</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    captions = {"fitness": "Fitness of every candidate", "terms": "Each fitness term of the best so far",
                "recipe": "The best recipe's parameters", "route": "The best recipe's routed path",
                "front": "Pareto front"}
    for name, path in pngs.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{captions[name]}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    if rd.best.is_file():
        parts.append(f"<h2>Best recipe so far</h2><pre>{esc(rd.best.read_text())}</pre>")
    parts.append("<h2>Generations</h2><pre>" + esc("\n".join(generation_table(history))) + "</pre></body></html>\n")
    return "".join(parts)
