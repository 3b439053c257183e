"""The end-of-search table: each source, a uniform merge and the best recipe on the held-out test tasks."""

from __future__ import annotations

from ..recipe import Recipe, parse_recipe
from ..space.config import SearchConfig


def comparison_recipes(cfg: SearchConfig, best: Recipe) -> dict[str, dict]:
    """Name -> recipe: every source alone, the uniform average of the models, the best found."""
    rows: dict[str, dict] = {}
    for ref in cfg.model_refs():
        rows[ref.rstrip("/").rsplit("/", 1)[-1]] = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
    rows["uniform merge"] = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in cfg.models]}
    rows["best found"] = best.to_dict()
    return rows


def score_table(pool, cfg: SearchConfig, best: Recipe, splits: tuple[str, ...] = ("test",)) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """Scores of every comparison row on each split's terms (split -> row -> result),
    computed on the search's own workers."""
    rows = comparison_recipes(cfg, best)
    for name, recipe in rows.items():
        parse_recipe(recipe)  # a bad row is a bug here, not a user error at the end of a long run
        for split in splits:
            pool.submit((split, name), recipe, split)
    out: dict[str, dict[str, dict]] = {split: {} for split in splits}
    while pool.pending:
        o = pool.next_outcome()
        split, name = o.tag
        out[split][name] = o.result if o.result is not None else {"error": o.error}
    return list(rows), {split: {name: out[split][name] for name in rows} for split in splits}


def format_table(cfg: SearchConfig, order: list[str], results: dict[str, dict]) -> str:
    cols = [(t.task, t.metric) for t in cfg.test]
    head = "| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " | mean |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name in order:
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | " + " | ".join("error" for _ in cols) + f" | {r['error']} |")
            continue
        vals = [r["scores"][t][m] for t, m in cols]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
    return "\n".join(lines)
