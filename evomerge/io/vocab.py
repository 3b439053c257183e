"""The vocabulary a merge's tokenizer choice gives, checked against mergekit's semantics.

Whenever a recipe names a tokenizer (``tokenizer_source`` or a ``tokenizer:`` section),
mergekit 0.1.5 builds the output tokenizer (``union``: the base's plus every model's added
tokens; ``base``; or a model's) and re-indexes every model's embedding and head rows to it,
filling tokens a model lacks from the others. When all the models share one vocabulary
(the same token -> id map, with as many embedding rows as tokens) that is the identity and
``union`` is the base's tokenizer: evomerge copies the chosen tokenizer and merges as usual,
with mergekit's tensors. Otherwise it refuses, saying which models differ, rather than write
tensors mergekit would not (differing vocabularies are not supported yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import UserError


def check_shared(recipe, sources: Mapping) -> None:
    """Raise UserError unless the recipe's tokenizer choice leaves every vocabulary as it is."""
    choice = recipe.tokenizer_choice()
    if choice is None:
        return
    vocabs = {}
    for ref in recipe.model_refs():
        source = sources[ref]
        tokenizer = load_tokenizer(Path(source.path))
        if tokenizer is None:
            continue
        vocab = tokenizer.get_vocab()
        rows = source.arch.vocab_size
        if rows != len(vocab):
            raise UserError(f"{ref}: {rows} embedding rows for {len(vocab)} tokens; with a tokenizer choice "
                            f"({choice!r}) mergekit re-sizes the rows to the tokenizer, which evomerge does not do yet: "
                            "remove tokenizer_source/tokenizer to keep the rows as they are")
        vocabs[ref] = vocab
    first = next(iter(vocabs), None)
    for ref, vocab in vocabs.items():
        if vocab != vocabs[first]:
            only = sorted(set(vocab) - set(vocabs[first]))[:3] or sorted(set(vocabs[first]) - set(vocab))[:3]
            raise UserError(f"{ref} and {first} have different vocabularies ({len(vocab)} vs {len(vocabs[first])} "
                            f"tokens; e.g. {only}): merging differing vocabularies (added tokens) is not supported yet")
    pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer is not None else None
    if pad and first is not None and len(vocabs[first]) % pad:
        raise UserError(f"tokenizer.pad_to_multiple_of {pad}: the vocabulary has {len(vocabs[first])} tokens, so mergekit "
                        "would add padding rows, which evomerge does not do yet; remove it or use a multiple")


def load_tokenizer(model_dir: Path):
    """``model_dir``'s tokenizer as AutoTokenizer loads it; None when it has none or it cannot
    be read (mergekit then gives that model no say: it assumes the base's)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        return None
