"""Vocabularies: the output tokenizer a recipe's tokenizer choice gives, and every model's
embedding and head rows re-indexed onto it, with mergekit 0.1.5's semantics (its
tokenizer/build.py and tokenizer/embed.py, read for what they do).

A tokenizer choice (``tokenizer_source`` or a ``tokenizer:`` section) names the output
vocabulary: ``base`` (the base model's, or the first model's), a model's, or ``union``
(the base's plus every token another model has, its added tokens with their settings);
``tokenizer.tokens`` adds tokens and says where their embeddings come from. Every
tensor with a vocabulary axis (embeddings, head) of every model is then re-indexed to
that vocabulary before the merge method sees it. A model that lacks a token gets, for
that row: the row of the only model that has it; else the base's, where the base is
among the tensor's models and has it; else the average over the models that have it
(summed in the models' order, divided once); zero where none has it; or what
``tokens:`` says (``force``: for every model, even those that have it). Rows past the
vocabulary when ``pad_to_multiple_of`` rounds it up hold each model's mean embedding.

Where the choice leaves every vocabulary as it is (one shared vocabulary, as many rows as
tokens, no ``tokens:``, no padding) nothing is re-indexed and the chosen model's tokenizer
files are copied: ``build`` returns None.

mergekit orders ``union``'s tokens from models other than the base by a Python set, so
two models adding different tokens can get their ids in either order from run to run;
evomerge takes the recipe's order (the base, then as listed).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


def load_tokenizer(model_dir: Path):
    """``model_dir``'s tokenizer as AutoTokenizer loads it; None when it has none or it cannot
    be read (mergekit then gives that model no say: it assumes the base's)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        return None


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor is indexed by token along its first axis (mergekit's
    ``vocabulary_axis: 0``): the input embeddings and the head."""
    return name.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight", "embed_out.weight"))


@dataclass(frozen=True)
class TokenRule:
    """Where a token's row comes from for models that lack it (all models when ``force``):
    ``model``'s row of ``row`` (None: of the token itself), or zeros when ``model`` is None."""

    model: str | None
    row: int | None = None
    force: bool = False


@dataclass(eq=False)
class VocabPlan:
    tokenizer: object  # the output tokenizer (transformers), written with save_pretrained
    copy_from: str | None  # a model whose tokenizer files are the output's as they are
    ntokens: int
    size: int  # rows written: ntokens rounded up to pad_to_multiple_of
    rows: dict[str, np.ndarray]  # model -> its row for each output token id, -1 where it lacks it
    rules: dict[int, TokenRule]  # output token id -> the recipe's tokens: entry
    base: str | None
    names: list[str]  # output token id -> token (for messages)
    # a worker's resident sources never change: their re-indexed rows are kept, per tensor
    cache: dict | None = field(default=None)

    def align(self, tensors: Mapping[str, torch.Tensor], key=None) -> dict[str, torch.Tensor]:
        """Every model's tensor (vocabulary first, as read, the tensor's models in slice
        order) re-indexed to the output vocabulary, in the tensors' promoted dtype."""
        if self.cache is not None and key is not None and key in self.cache:
            return self.cache[key]
        out = _align(self, tensors)
        if self.cache is not None and key is not None:
            self.cache[key] = out
        return out


def _align(plan: VocabPlan, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    first = tensors[models[0]]
    shape, device = tuple(first.shape[1:]), first.device
    for m in models:
        if tuple(tensors[m].shape[1:]) != shape:
            raise UserError(f"{m}: embedding width {list(tensors[m].shape[1:])} differs from {models[0]}'s {list(shape)}")
    rows = {m: torch.as_tensor(plan.rows[m], dtype=torch.long) for m in models}
    have = torch.stack([rows[m] >= 0 for m in models])  # (models, tokens)
    forced = torch.zeros(plan.ntokens, dtype=torch.bool)
    for i, rule in plan.rules.items():
        forced[i] = rule.force
    needed = torch.nonzero(forced | ~have.all(0)).flatten().tolist()

    defaults: dict[int, torch.Tensor] = {}
    average: list[int] = []
    for i in needed:
        rule = plan.rules.get(i) or _default_rule(plan, models, have[:, i].tolist(), i)
        if rule is _AVERAGE:
            average.append(i)
        elif rule.model is None:
            defaults[i] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            if rule.model not in tensors:
                raise UserError(f"token {plan.names[i]!r} takes its embedding from {rule.model}, which is not among the "
                                f"models of this tensor ({', '.join(models)})")
            src = plan.rows[rule.model][i] if rule.row is None else rule.row
            if src < 0:
                raise UserError(f"token {plan.names[i]!r} takes its embedding from {rule.model}, whose vocabulary lacks "
                                "it; name a token it has (kind: model_token) or kind: zero")
            defaults[i] = tensors[rule.model][src].to(dtype)
    if average:
        ids = torch.tensor(average, dtype=torch.long)
        acc = torch.zeros((len(average), *shape), dtype=dtype, device=device)
        for m in models:  # mergekit's order: zeros, plus each model that has it, then one division
            hit = rows[m][ids] >= 0
            acc[hit] = acc[hit] + tensors[m].to(dtype)[rows[m][ids][hit]]
        counts = have[:, ids].sum(0)
        for c in sorted(set(counts.tolist())):
            sel = counts == c
            acc[sel] = acc[sel] / c
        defaults.update(zip(average, acc))

    result = {}
    default_ids = torch.tensor(sorted(defaults), dtype=torch.long)
    default_rows = torch.stack([defaults[i] for i in sorted(defaults)]) if defaults else None
    for m in models:
        new = torch.zeros((plan.size, *shape), dtype=dtype, device=device)
        take = (rows[m] >= 0) & ~forced
        idx = torch.nonzero(take).flatten()
        new[idx] = tensors[m].to(dtype)[rows[m][idx]]
        if default_rows is not None:
            fill = ~take[default_ids]
            new[default_ids[fill]] = default_rows[fill]
        if plan.size > plan.ntokens:  # padding rows: the mean embedding (mergekit, after Hewitt 2021)
            new[plan.ntokens:] = torch.mean(new[:plan.ntokens], dim=0)
        result[m] = new
    return result


_AVERAGE = TokenRule(model="<average>")


def _default_rule(plan: VocabPlan, models: list[str], has: list[bool], i: int) -> TokenRule:
    present = [m for m, h in zip(models, has) if h]
    if len(present) == 1:
        return TokenRule(present[0])
    if not present:
        return TokenRule(None)
    if plan.base in models and plan.rows[plan.base][i] >= 0:
        return TokenRule(plan.base)
    return _AVERAGE


# --- building the plan ----------------------------------------------------------------


def build(recipe, sources: Mapping) -> VocabPlan | None:
    """The recipe's vocabulary plan, or None where its tokenizer choice changes no row."""
    return build_for(recipe.tokenizer_choice(), recipe.tokenizer, recipe.model_refs(), recipe.base_model, sources)


def build_for(choice: str | None, section, refs: list[str], base: str | None, sources: Mapping) -> VocabPlan | None:
    """``choice``: union, base or a model (None: no choice); ``section``: the ``tokenizer:``
    section, if any; ``refs``: every model, the base first."""
    if choice is None:
        return None
    token_cfg = dict(section.tokens or {}) if section is not None else {}
    pad = section.pad_to_multiple_of if section is not None else None
    base = base or refs[0]
    if choice not in ("union", "base") and choice not in refs:
        raise UserError(f"tokenizer source {choice!r} is not one of the recipe's models; name one of them, base or union")

    tokenizers, rows = {}, {}
    for ref in refs:
        rows[ref] = _rows(ref, sources[ref])
        tok = load_tokenizer(Path(sources[ref].path))
        if tok is None:
            if ref == base or ref == choice:
                raise UserError(f"{ref}: no tokenizer could be loaded, and the output's comes from it; give it its "
                                "tokenizer files or choose another tokenizer source")
            continue  # as mergekit: assumed to be the base's
        vocab = tok.get_vocab()
        beyond = [t for t, i in vocab.items() if i >= rows[ref]]
        if beyond:
            raise UserError(f"{ref}: its tokenizer has {len(beyond)} tokens with ids past its {rows[ref]} embedding rows "
                            f"(e.g. {sorted(beyond)[:3]}); fix the checkpoint's vocab_size or its tokenizer")
        tokenizers[ref] = tok

    if choice == "union":
        out, copy_from = _union(base, tokenizers, rows)
    else:
        source = base if choice == "base" else choice
        out, copy_from = tokenizers[source], source
    vocab = out.get_vocab()
    new = [t for t in token_cfg if t not in vocab]
    if new:
        out = _copy(out)
        for t in new:
            out.add_tokens(t)
        copy_from = None
    vocab = out.get_vocab()
    ntokens = len(vocab)
    names = [""] * ntokens
    for t, i in vocab.items():
        names[i] = t
    size = -(-ntokens // pad) * pad if pad else ntokens

    perm = {}
    for ref in refs:
        own = tokenizers.get(ref, tokenizers[base]).get_vocab()
        perm[ref] = np.array([own.get(t, -1) for t in names], dtype=np.int64)
    rules = {vocab[t]: _rule(t, cfg, refs, tokenizers, rows) for t, cfg in token_cfg.items()}
    for i, rule in rules.items():
        if rule.model is not None and rule.row is None and perm[rule.model][i] < 0:
            raise UserError(f"tokenizer.tokens.{names[i]}: takes its embedding from {rule.model}, whose vocabulary lacks "
                            "it; name a token it has (kind: model_token) or kind: zero")

    identity = np.arange(ntokens)
    if (not rules and size == ntokens and copy_from is not None
            and all(rows[r] == ntokens and np.array_equal(perm[r], identity) for r in refs)):
        return None
    return VocabPlan(out, copy_from, ntokens, size, perm, rules, base, names)


def _rows(ref: str, source) -> int:
    n = source.arch.vocab_size
    if not isinstance(n, int):
        raise UserError(f"{ref}: config.json has no vocab_size, which a tokenizer choice needs")
    return n


def _rule(token: str, cfg, refs: list[str], tokenizers: dict, rows: dict) -> TokenRule:
    src = cfg.source
    if isinstance(src, str):
        model, row = src, None
    elif src.kind == "zero":
        return TokenRule(None, None, cfg.force)
    else:
        model = src.model
        if src.token_id is not None:
            row = src.token_id
        else:
            own = tokenizers.get(model)
            row = own.get_vocab().get(src.token) if own is not None else None
            if row is None:
                raise UserError(f"tokenizer.tokens.{token}: {model}'s tokenizer has no token {src.token!r}")
    if model not in refs:
        raise UserError(f"tokenizer.tokens.{token}: {model!r} is not one of the recipe's models")
    if row is not None and not 0 <= row < rows[model]:
        raise UserError(f"tokenizer.tokens.{token}: token_id {row} is outside {model}'s {rows[model]} rows")
    return TokenRule(model, row, cfg.force)


def _copy(tokenizer):
    """A fresh copy (saved and reloaded, as mergekit does), so adding tokens leaves the original alone."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d)


def _union(base: str, tokenizers: dict, rows: dict):
    """The base's tokenizer plus every other model's tokens: plain tokens it lacks as added
    tokens, then every model's added tokens with the settings of the first model that has
    them. (tokenizer, None), or (the base's tokenizer, base) where it already has them all."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for ref in [base, *(r for r in tokenizers if r != base)]:
        tok = tokenizers[ref]
        for t, i in tok.get_vocab().items():
            if i < rows[ref]:
                plain.setdefault(t)
        for i, info in tok.added_tokens_decoder.items():
            if i < rows[ref]:
                added.setdefault(info.content, info)
    base_tok = tokenizers[base]
    base_vocab = base_tok.get_vocab()
    base_added = {info.content for info in base_tok.added_tokens_decoder.values()}
    missing = [t for t in plain if t not in added and t not in base_vocab]
    if not missing and set(added) <= base_added:
        return base_tok, base
    out = _copy(base_tok)
    for t in missing:
        out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out, None
