"""A recipe's ``chat_template``, as mergekit 0.1.5 reads it: ``auto`` or a Jinja template.

``auto`` takes the template most of the recipe's models have (as ``AutoTokenizer`` sees it,
stripped; a dict of named templates counts by its ``default``); a tie goes to the model named
first, the base first (mergekit's order there is a set's, so not reproducible); no template
among them leaves the tokenizer source's as it is. Any other value is the template's Jinja
text itself (mergekit refuses a value under 20 characters or without a ``{``, and so does the
recipe's validation), or one of mergekit's names (chatml, llama3, alpaca, mistral, exaone):
evomerge's own template of that format (io/chat_templates.py), rendering as mergekit's does.

The result is written the way ``save_pretrained`` writes a template in transformers 5: as
``chat_template.jinja``, which takes precedence over a ``chat_template`` in
``tokenizer_config.json`` (dropped from the copy, so the directory says one thing).
mergekit applies a chat template only when it builds a tokenizer (``tokenizer_source`` or
``tokenizer:`` given) and ignores it with a warning otherwise; evomerge always applies it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .chat_templates import NAMED
from .vocab import load_tokenizer

AUTO = "auto"
JINJA_FILE = "chat_template.jinja"


def resolve(template: str | None, model_dirs: Sequence[Path]) -> str | None:
    """The template text to write, or None to keep the tokenizer source's; ``template`` is a
    recipe's, already checked there (evomerge/recipe.py)."""
    if template in NAMED:
        return NAMED[template]
    if template != AUTO:
        return template
    found = [t for d in model_dirs if (t := read(d))]
    return Counter(found).most_common(1)[0][0] if found else None


def read(model_dir: Path) -> str | None:
    """``model_dir``'s chat template as AutoTokenizer loads it, stripped; None when it has none."""
    tokenizer = load_tokenizer(model_dir)
    template = tokenizer.chat_template if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if template else None


def write(out_dir: Path, template: str) -> None:
    (out_dir / JINJA_FILE).write_text(template, encoding="utf-8")
    config = out_dir / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
